"""Battles stay anonymous until the vote (issue 14): each test is a way a user could name a
side before voting, or make a vote count for answers it did not judge, tried from outside
over HTTP against the real gateway, vLLM (tiny model) and Redis."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
import redis
from pydantic import SecretStr

from conftest import FakeModelServer, GatewayServer
from feedback.vote_record import VoteRecord
from feedback.vote_stream import VOTES_STREAM

QUESTION = [{"role": "user", "content": "Which is better?"}]
VERSIONS = ("base", "policy-v1", "policy-v2")


def new_battle(http: httpx.Client, url: str = "", **extra) -> dict:
    response = http.post(f"{url}/v1/battles", json={"messages": QUESTION, "max_tokens": 4,
                                                     **extra})
    assert response.status_code == 200, response.text
    return response.json()


def votes_in_stream(settings) -> list[VoteRecord]:
    client = redis.Redis.from_url(settings.effective_redis_url)
    return [VoteRecord.from_json(fields[b"record"]) for _, fields in client.xrange(VOTES_STREAM)]


@pytest.mark.parametrize("field,value", [("temperature", 0), ("seed", 7), ("top_p", 0.1),
                                         ("logprobs", True)])
def test_battles_refuse_client_sampling_settings(gateway, field, value):
    # At temperature 0 a battle answer could be reproduced per version through the chat route.
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        refused = http.post("/v1/battles", json={"messages": QUESTION, field: value})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["param"] == field and "server's settings" in error["message"]
        battle = new_battle(http)
        follow = http.post(f"/v1/battles/{battle['battle_id']}/messages",
                           json={"content": "Why?", field: value})
        assert follow.status_code == 422 and follow.json()["error"]["param"] == field


def per_version_series(text: str) -> dict[str, str]:
    """Every /metrics sample whose labels name a version."""
    names = "|".join(re.escape(v) for v in VERSIONS)
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()
            if re.search(rf'version="({names})"', line)}


def test_battle_traffic_is_not_counted_per_version_on_metrics(gateway, two_policies):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        http.post("/v1/chat/completions", json={"model": "policy-v1", "messages": QUESTION,
                                                "max_tokens": 3})
        before = per_version_series(http.get("/metrics").text)
        assert before, "chat traffic is still counted per version"
        battle = new_battle(http)
        with http.stream("POST", "/v1/battles", json={"messages": QUESTION, "max_tokens": 4,
                                                      "stream": True}) as streamed:
            streamed.read()
        after = http.get("/metrics").text
        assert per_version_series(after) == before
        assert re.search(r'arena_completion_tokens_total\{route="battle",version="-"\} ([1-9])',
                         after)
        # The reveal comes with the vote, not before.
        assert http.post(f"/v1/battles/{battle['battle_id']}/vote",
                         json={"winner": "a"}).status_code == 200


def test_metrics_token_protects_metrics(gateway_settings):
    server = GatewayServer(gateway_settings.model_copy(
        update={"metrics_token": SecretStr("scrape-me")}))
    try:
        refused = httpx.get(f"{server.url}/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"]
        assert httpx.get(f"{server.url}/metrics",
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and "arena_requests_total" in ok.text
    finally:
        server.stop()


def test_follow_up_after_a_side_was_retired_does_not_name_it(gateway, gateway_settings,
                                                              registry, two_policies):
    registry.retire("policy-v2", actor="test")  # the pair is now base vs policy-v1
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = new_battle(http)
        registry.retire("policy-v1", actor="test")
        follow = http.post(f"/v1/battles/{battle['battle_id']}/messages",
                           json={"content": "Why?"})
        assert follow.status_code == 409
        assert follow.json()["error"]["code"] == "battle_model_retired"
        assert not any(v in follow.text for v in VERSIONS)
        # The answers shown can still be judged.
        vote = http.post(f"/v1/battles/{battle['battle_id']}/vote", json={"winner": "b"})
        assert vote.status_code == 200
    [record] = votes_in_stream(gateway_settings)
    assert record.answer_b == battle["b"]["content"]


@pytest.mark.parametrize("fake_model_server", ["hang"], indirect=True)
def test_no_vote_while_a_follow_up_is_being_answered(gateway, gateway_settings,
                                                     fake_model_server: FakeModelServer):
    # The follow-up goes through a second gateway whose model server never answers, so the
    # turn is in progress for as long as the test wants (both gateways share the Redis).
    hanging = GatewayServer(gateway_settings.model_copy(update={
        "vllm_urls": [fake_model_server.url], "request_timeout_s": 3.0,
        "replica_sync_interval_s": 3600.0}))
    try:
        with httpx.Client(timeout=60) as http:  # one cookie jar: one session, both gateways
            battle = new_battle(http, gateway.url)
            battle_id = battle["battle_id"]
            follow: list[httpx.Response] = []
            turn = threading.Thread(target=lambda: follow.append(http.post(
                f"{hanging.url}/v1/battles/{battle_id}/messages", json={"content": "Why?"})))
            turn.start()
            assert fake_model_server.posted.wait(20)
            during = http.post(f"{gateway.url}/v1/battles/{battle_id}/vote",
                               json={"winner": "a"})
            assert during.status_code == 409, during.text
            assert during.json()["error"]["code"] == "battle_incomplete"
            second_turn = http.post(f"{gateway.url}/v1/battles/{battle_id}/messages",
                                    json={"content": "And?"})
            assert second_turn.status_code == 409
            assert second_turn.json()["error"]["code"] == "turn_in_progress"
            turn.join(30)
            assert follow[0].status_code == 504  # the turn failed ...
            # ... so the answers shown before it are votable again, exactly once.
            after = http.post(f"{gateway.url}/v1/battles/{battle_id}/vote",
                              json={"winner": "a"})
            assert after.status_code == 200
            again = http.post(f"{gateway.url}/v1/battles/{battle_id}/vote",
                              json={"winner": "b"})
            assert again.status_code == 409
    finally:
        hanging.stop()
    [record] = votes_in_stream(gateway_settings)
    assert (record.winner, record.answer_a) == ("a", battle["a"]["content"])
    assert len(record.conversation_a) == 1  # the failed turn left no trace


def test_a_vote_judges_the_latest_turn_and_no_turn_follows_it(gateway, gateway_settings):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = new_battle(http)
        follow = http.post(f"/v1/battles/{battle['battle_id']}/messages",
                           json={"content": "Why?", "max_tokens": 3}).json()
        assert http.post(f"/v1/battles/{battle['battle_id']}/vote",
                         json={"winner": "b"}).status_code == 200
        late = http.post(f"/v1/battles/{battle['battle_id']}/messages", json={"content": "?"})
        assert late.status_code == 409 and late.json()["error"]["code"] == "already_voted"
    [record] = votes_in_stream(gateway_settings)
    assert record.answer_b == follow["b"]["content"]
