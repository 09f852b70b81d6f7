"""Side-by-side battles and votes against the real vLLM server and Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import redis

from feedback.vote_record import VoteRecord, complete_ballot
from feedback.vote_stream import VOTES_STREAM

PROMPT = {"messages": [{"role": "user", "content": "Which is better?"}], "max_tokens": 6}


def start_battle(http: httpx.Client, **extra) -> dict:
    response = http.post("/v1/battles", json={**PROMPT, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_battle_returns_two_anonymous_answers(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = start_battle(http)
    assert set(battle) == {"battle_id", "a", "b"}
    assert battle["a"]["content"] and battle["b"]["content"]
    assert "model" not in json.dumps(battle)


def test_cold_start_battle_compares_two_samples_of_base(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = start_battle(http, max_tokens=12)
        reveal = http.post(f"/v1/battles/{battle['battle_id']}/vote", json={"winner": "a"}).json()
    assert reveal["a_model"] == reveal["b_model"] == "base"
    # Different seeds: two independent samples (12 random tokens from a 49k vocabulary).
    assert battle["a"]["content"] != battle["b"]["content"]


def test_with_several_live_versions_the_pair_is_always_two_different_ones(gateway, registry,
                                                                         two_policies):
    registry.retire("policy-v2", actor="test")
    seen = set()
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        for _ in range(6):
            battle = start_battle(http, max_tokens=2)
            reveal = http.post(f"/v1/battles/{battle['battle_id']}/vote",
                               json={"winner": "tie"}).json()
            assert reveal["a_model"] != reveal["b_model"]
            seen |= {reveal["a_model"], reveal["b_model"]}
    assert seen == {"base", "policy-v1"}  # never the retired one


def test_vote_goes_into_the_stream_with_the_whole_record(gateway, gateway_settings):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = start_battle(http)
        response = http.post(f"/v1/battles/{battle['battle_id']}/vote",
                             json={"winner": "both_bad"})
    assert response.status_code == 200
    entries = redis.Redis.from_url(gateway_settings.effective_redis_url).xrange(VOTES_STREAM)
    assert len(entries) == 1
    record = VoteRecord.from_json(entries[0][1][b"record"])
    assert record.battle_id == battle["battle_id"]
    assert record.winner == "both_bad"
    assert record.answer_a == battle["a"]["content"]
    assert record.answer_b == battle["b"]["content"]
    assert record.conversation_a == PROMPT["messages"]
    assert record.model_a == response.json()["a_model"]


def test_vote_errors(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as owner, \
            httpx.Client(base_url=gateway.url, timeout=60) as stranger:
        battle = start_battle(owner)
        url = f"/v1/battles/{battle['battle_id']}/vote"
        stranger.get("/v1/models")  # gets its own session cookie
        forbidden = stranger.post(url, json={"winner": "a"})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "wrong_session"
        assert owner.post(url, json={"winner": "sideways"}).status_code == 422
        assert owner.post(url, json={"winner": "b"}).status_code == 200
        second = owner.post(url, json={"winner": "a"})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "already_voted"
        unknown = owner.post("/v1/battles/no-such-battle/vote", json={"winner": "a"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "not_found_error"


def test_expired_battle_is_404(gateway_settings):
    from conftest import GatewayServer

    server = GatewayServer(gateway_settings.model_copy(update={"battle_ttl_s": 1}))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            battle = start_battle(http)
            redis.Redis.from_url(gateway_settings.effective_redis_url).delete(
                f"arena:battle:{battle['battle_id']}")  # what the TTL does after 1 s
            response = http.post(f"/v1/battles/{battle['battle_id']}/vote", json={"winner": "a"})
        assert response.status_code == 404
    finally:
        server.stop()


def test_follow_up_turn_continues_both_sides_with_the_same_pair(gateway, gateway_settings,
                                                                two_policies):
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        battle = start_battle(http)
        follow = http.post(f"/v1/battles/{battle['battle_id']}/messages",
                           json={"content": "And why?", "max_tokens": 5})
        assert follow.status_code == 200
        assert follow.json()["battle_id"] == battle["battle_id"]
        reveal = http.post(f"/v1/battles/{battle['battle_id']}/vote", json={"winner": "a"}).json()
        late = http.post(f"/v1/battles/{battle['battle_id']}/messages", json={"content": "More"})
        assert late.status_code == 409
    raw = redis.Redis.from_url(gateway_settings.effective_redis_url).xrange(VOTES_STREAM)[0][1]
    record = VoteRecord.from_json(raw[b"record"])
    assert (record.model_a, record.model_b) == (reveal["a_model"], reveal["b_model"])
    # Side a's history: first question, its first answer, the follow-up; then the new answer.
    assert [m["role"] for m in record.conversation_a] == ["user", "assistant", "user"]
    assert record.conversation_a[1]["content"] == battle["a"]["content"]
    assert record.conversation_b[1]["content"] == battle["b"]["content"]
    assert record.answer_a == follow.json()["a"]["content"]


def test_streaming_battle_tags_events_a_and_b_then_done(gateway):
    events: list[tuple[str, dict]] = []
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        with http.stream("POST", "/v1/battles", json={**PROMPT, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:])))
        assert {e for e, _ in events[:-1]} == {"a", "b"}
        assert events[-1][0] == "done"
        battle_id = events[-1][1]["battle_id"]
        assert battle_id == response.headers["x-battle-id"]
        assert http.post(f"/v1/battles/{battle_id}/vote", json={"winner": "a"}).status_code == 200


def test_battle_rate_limit(gateway_settings):
    from conftest import GatewayServer

    server = GatewayServer(gateway_settings.model_copy(update={"rate_battle_per_session": 1}))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/v1/battles", json=PROMPT).status_code == 200
            limited = http.post("/v1/battles", json=PROMPT)
            assert limited.status_code == 429 and limited.headers["retry-after"]
    finally:
        server.stop()


# --- the vote path (serve/votes.py + the vote script): battles seeded in Redis, no vLLM -------
def seed_battle(client: redis.Redis, session: str, ttl_s: int = 600) -> dict:
    """A finished battle stored as serve/battles.py stores it."""
    from serve.battles import BATTLE_KEY, battle_fields

    battle_id = uuid.uuid4().hex
    question = [{"role": "user", "content": f"Question {battle_id[:6]}?"}]
    battle = {"battle_id": battle_id, "session": session, "created_at": time.time(),
              "model_a": "base", "model_b": "policy-v1",
              "conversation_a": [*question, {"role": "assistant", "content": "Yes."}],
              "conversation_b": [*question, {"role": "assistant", "content": "No."}],
              "answer_a": "Yes.", "answer_b": "No."}
    client.hset(BATTLE_KEY.format(id=battle_id), mapping=battle_fields(battle))
    client.expire(BATTLE_KEY.format(id=battle_id), ttl_s)
    return battle


def session_cookie(settings, session: str) -> dict[str, str]:
    from itsdangerous import URLSafeSerializer

    from serve.sessions import COOKIE_NAME

    secret = settings.session_secret.get_secret_value()
    return {COOKIE_NAME: URLSafeSerializer(secret, salt="arena-session").dumps(session)}


def test_concurrent_votes_each_battle_counted_once(gateway, gateway_settings):
    """Votes that arrive together share one pipeline (group commit) yet each gets its own
    answer: 30 battles, each voted three times at once -> one 200 and two 409 per battle,
    and exactly one stream entry per battle, equal to the record the gateway promised."""
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    client.delete(VOTES_STREAM)
    battles = [seed_battle(client, "crowd-session") for _ in range(30)]  # 90 votes < limit

    async def crowd() -> list[tuple[str, int, dict]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                     cookies=session_cookie(gateway_settings,
                                                            "crowd-session")) as http:
            async def cast(battle: dict, winner: str) -> tuple[str, int, dict]:
                response = await http.post(f"/v1/battles/{battle['battle_id']}/vote",
                                           json={"winner": winner})
                return battle["battle_id"], response.status_code, response.json()

            return await asyncio.gather(*(cast(b, w) for b in battles
                                          for w in ("a", "tie", "both_bad")))

    answers = asyncio.run(crowd())
    by_battle: dict[str, list[int]] = {}
    for battle_id, status, _ in answers:
        by_battle.setdefault(battle_id, []).append(status)
    assert all(sorted(codes) == [200, 409, 409] for codes in by_battle.values()), by_battle
    assert all(body["a_model"] == "base" and body["b_model"] == "policy-v1"
               for _, status, body in answers if status == 200)
    entries = client.xrange(VOTES_STREAM)
    records = [VoteRecord.from_json(fields[b"record"]) for _, fields in entries]
    assert sorted(r.battle_id for r in records) == sorted(by_battle)
    winners = {body["battle_id"]: body["winner"] for _, s, body in answers if s == 200}
    for (_, fields), record in zip(entries, records, strict=True):
        # The script appended the outcome to the stored ballot exactly as Python would.
        ballot = client.hget(f"arena:battle:{record.battle_id}", "ballot").decode()
        assert fields[b"record"].decode() == complete_ballot(ballot, record.winner,
                                                             record.voted_at)
        assert record.winner == winners[record.battle_id]
        assert record.answer_a == "Yes." and record.conversation_a[0]["role"] == "user"
        assert record.session == "crowd-session"


def test_vote_after_redis_lost_its_scripts(gateway, gateway_settings):
    """Redis keeps no scripts across a restart: the gateway reloads the vote script."""
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    first, second = (seed_battle(client, "s1") for _ in range(2))
    with httpx.Client(base_url=gateway.url, timeout=30,
                      cookies=session_cookie(gateway_settings, "s1")) as http:
        assert http.post(f"/v1/battles/{first['battle_id']}/vote",
                         json={"winner": "a"}).status_code == 200
        client.script_flush()
        response = http.post(f"/v1/battles/{second['battle_id']}/vote", json={"winner": "b"})
    assert response.status_code == 200, response.text
    assert response.json()["b_model"] == "policy-v1"


def test_vote_body_errors_say_what_to_send(gateway, gateway_settings):
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    battle = seed_battle(client, "s2")
    url = f"/v1/battles/{battle['battle_id']}/vote"
    with httpx.Client(base_url=gateway.url, timeout=30,
                      cookies=session_cookie(gateway_settings, "s2")) as http:
        not_json = http.post(url, content=b"winner=a",
                             headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert "winner" in not_json.json()["error"]["message"]
        assert not_json.json()["error"]["type"] == "invalid_request_error"
        too_big = http.post(url, json={"winner": "a", "pad": "x" * 10_000})
        assert too_big.status_code == 413
        missing = http.post(url, json={})
        assert missing.status_code == 422 and missing.json()["error"]["param"] == "winner"
        wrong_method = http.get(url)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        # None of that counted: the battle can still be voted on, once.
        assert http.post(url, json={"winner": "tie"}).status_code == 200


def test_vote_rate_limit_per_session(gateway_settings):
    from conftest import GatewayServer

    server = GatewayServer(gateway_settings.model_copy(update={"rate_vote_per_session": 2}))
    client = redis.Redis.from_url(gateway_settings.effective_redis_url)
    battles = [seed_battle(client, "s3") for _ in range(3)]
    try:
        with httpx.Client(base_url=server.url, timeout=30,
                          cookies=session_cookie(gateway_settings, "s3")) as http:
            codes = [http.post(f"/v1/battles/{b['battle_id']}/vote", json={"winner": "a"})
                     for b in battles]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert codes[2].headers["retry-after"]
        assert codes[2].json()["error"]["code"] == "rate_limit_exceeded"
        assert "per session" in codes[2].json()["error"]["message"]
    finally:
        server.stop()
