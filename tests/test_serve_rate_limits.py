"""Rate limits against a script (issue 12): dropping the cookie gains no allowance, an IPv6
client is counted by its /64, and X-Forwarded-For counts only from a trusted proxy. Real
gateway and Redis; no model server is needed (votes and refused battles are counted before
one is asked)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis

from conftest import GatewayServer
from core.settings import Settings
from serve.rate_limit import address_key

NO_MODEL_SERVER = ["http://127.0.0.1:9"]
OFF = {f"rate_{action}_per_{who}": 0 for action in ("chat", "battle", "vote")
       for who in ("session", "ip")}


@contextmanager
def gateway_with(settings: Settings, **update: object) -> Iterator[GatewayServer]:
    """A gateway with these limits, and this minute's counters of earlier ones cleared."""
    redis.Redis.from_url(settings.effective_redis_url).flushall()
    server = GatewayServer(settings.model_copy(update={
        "vllm_urls": NO_MODEL_SERVER, "replica_sync_interval_s": 3600.0, **OFF, **update}))
    try:
        yield server
    finally:
        server.stop()


def vote_statuses(http: httpx.Client, count: int, forwarded_for: str | None = None) -> list[int]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return [http.post("/v1/battles/no-such-battle/vote", json={"winner": "a"},
                      headers=headers).status_code for _ in range(count)]


def test_address_keys():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2::ffff") \
        == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("unknown") == "unknown"


def test_dropping_the_cookie_gains_no_allowance(settings):
    with gateway_with(settings, rate_vote_per_session=3, rate_battle_per_session=2,
                      max_message_chars=5) as server:
        # Without cookies every request is a new session: they still share one allowance.
        cookieless = [httpx.post(f"{server.url}/v1/battles/x/vote", json={"winner": "a"})
                      for _ in range(4)]
        assert [r.status_code for r in cookieless] == [404, 404, 404, 429]
        assert cookieless[-1].json()["error"]["code"] == "rate_limit_exceeded"
        assert int(cookieless[-1].headers["retry-after"]) >= 1
        # A client that keeps the cookie it is given has its own allowance from then on.
        with httpx.Client(base_url=server.url) as http:
            assert vote_statuses(http, 5) == [429, 404, 404, 404, 429]
        refused = {"messages": [{"role": "user", "content": "too long for the cap"}]}
        battles = [httpx.post(f"{server.url}/v1/battles", json=refused).status_code
                   for _ in range(3)]
        assert battles == [400, 400, 429]


def test_ipv6_clients_are_counted_by_their_64(settings):
    with gateway_with(settings, rate_vote_per_ip=2, trusted_proxies=["127.0.0.1/32"]) as server, \
            httpx.Client(base_url=server.url) as http:
        assert vote_statuses(http, 1, "2001:db8:0:1::1") == [404]
        assert vote_statuses(http, 2, "2001:db8:0:1:ffff::2") == [404, 429]  # same /64
        assert vote_statuses(http, 2, "2001:db8:0:2::1") == [404, 404]  # the next /64
        assert vote_statuses(http, 2, "203.0.113.7") == [404, 404]


def test_forwarded_for_counts_only_from_a_trusted_proxy(settings):
    # No trusted proxy (the default): every header names another client, all are 127.0.0.1.
    with gateway_with(settings, rate_vote_per_ip=2) as server, \
            httpx.Client(base_url=server.url) as http:
        assert [vote_statuses(http, 1, f"203.0.113.{i}")[0] for i in range(3)] == [404, 404, 429]
    # A trusted network that is not the peer's: the header is ignored as well.
    with gateway_with(settings, rate_vote_per_ip=2, trusted_proxies=["10.0.0.0/8"]) as server, \
            httpx.Client(base_url=server.url) as http:
        assert [vote_statuses(http, 1, f"203.0.113.{i}")[0] for i in range(3)] == [404, 404, 429]
    # From a trusted proxy: the client it names (the last address it appended) is counted.
    with gateway_with(settings, rate_vote_per_ip=2, trusted_proxies=["127.0.0.0/8"]) as server, \
            httpx.Client(base_url=server.url) as http:
        assert [vote_statuses(http, 1, f"198.51.100.9, 203.0.113.{i}")[0]
                for i in range(3)] == [404, 404, 404]
        assert vote_statuses(http, 2, "198.51.100.9, 203.0.113.1") == [404, 429]


def test_trusted_proxies_setting(monkeypatch):
    assert Settings(_env_file=None).trusted_proxies == []
    monkeypatch.setenv("ARENA_TRUSTED_PROXIES", '["10.0.0.0/8", "fd00::/8"]')
    assert [str(n) for n in Settings(_env_file=None).trusted_proxies] == ["10.0.0.0/8",
                                                                          "fd00::/8"]
    monkeypatch.setenv("ARENA_TRUSTED_PROXIES", '["not-a-network"]')
    with pytest.raises(ValueError):
        Settings(_env_file=None)
