"""Side-by-side battles and votes against the real vLLM server and Redis."""

from __future__ import annotations

import json

import httpx
import redis

from feedback.vote_record import VoteRecord
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
