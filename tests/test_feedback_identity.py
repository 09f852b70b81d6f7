"""Votes on answers that name a version (issue 14): flagged at the gateway, archived with the
flag, and left out of the ratings (archive refit and online ranker) and of training."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from conftest import GatewayServer
from elo.ratings_store import load_online
from feedback.archive import Archive
from feedback.consumers import Ranker
from feedback.identity import IDENTITY_FLAG, vote_flags
from feedback.stream_consumer import ConsumerConfig
from feedback.vote_record import VoteRecord
from feedback.vote_stream import VOTES_STREAM
from learner.vote_source import text_votes

USER = {"role": "user", "content": "Who are you?"}


def vote(battle_id: str, winner: str = "a", flags: list[str] | None = None) -> VoteRecord:
    return VoteRecord(battle_id=battle_id, model_a="base", model_b="policy-v1", winner=winner,
                      conversation_a=[USER], conversation_b=[USER], answer_a="Hi.",
                      answer_b="Hello.", session="s", battle_created_at=1.0, voted_at=2.0,
                      flags=flags or [])


@pytest.mark.parametrize("answer,flagged", [
    ("I am policy-v2, the newest.", True),
    ("POLICY-V2 here.", True),
    ("policy-v20 is not a version of this battle.", False),
    ("The base of a triangle.", False),  # `base` is an everyday word: never a tell
    ("Made by SmolLM's authors.", True),  # an identity word of the deployment
    ("A small language model.", False),
])
def test_answers_that_name_a_version_are_flagged(answer: str, flagged: bool):
    flags = vote_flags(["Fine.", answer], ["base", "policy-v2"], ["SmolLM"])
    assert flags == ([IDENTITY_FLAG] if flagged else [])


def test_flagged_votes_are_archived_but_not_rated_or_trained_on(tmp_path: Path):
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    archive.insert_votes([vote("v1"), vote("v2", "b", [IDENTITY_FLAG]), vote("v3", "b")])
    assert archive.count() == 3
    stored = {s.record.vote_id: s.record.flags for s in archive.iter_votes()}
    assert stored == {"v1": [], "v2": [IDENTITY_FLAG], "v3": []}
    assert sum(row.n for row in archive.pair_counts()) == 2  # v2 is not in the fit
    assert [r.vote_id for r in text_votes([s.record for s in archive.iter_votes()])] == \
        ["v1", "v3"]


def test_an_archive_without_the_newer_columns_is_migrated(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # the votes table as the first release created it
        conn.execute(text(
            "CREATE TABLE votes (vote_id VARCHAR PRIMARY KEY, model_a VARCHAR NOT NULL, "
            "model_b VARCHAR NOT NULL, winner VARCHAR(16) NOT NULL, conversation_a JSON NOT "
            "NULL, conversation_b JSON NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL,"
            " session VARCHAR NOT NULL, battle_created_at FLOAT NOT NULL, voted_at FLOAT NOT "
            "NULL, archived_at FLOAT NOT NULL, stream_entry_id VARCHAR)"))
        conn.execute(text(
            "INSERT INTO votes VALUES ('old', 'base', 'policy-v1', 'a', '[]', '[]', 'x', 'y', "
            "'s', 1.0, 2.0, 3.0, NULL)"))
    engine.dispose()
    archive = Archive(url)
    archive.insert_votes([vote("new", "b", [IDENTITY_FLAG])])
    assert {s.record.vote_id: s.record.flags for s in archive.iter_votes()} == \
        {"old": [], "new": [IDENTITY_FLAG]}
    assert sum(row.n for row in archive.pair_counts()) == 1
    # The style columns arrived too, filled from the old row's answers ("x" / "y": 1 word).
    keys, styles = archive.style_rows()
    assert keys == [("base", "policy-v1", "a")] and styles == [[1, 0, 0, 0, 1, 0, 0, 0]]
    # And the voter address: none known for the old row; its session alone is its voter.
    old = next(s.record for s in archive.iter_votes() if s.record.vote_id == "old")
    assert old.voter_address == "" and old.voters == ("s",)
    assert sum(row.n for row in archive.pair_counts(flagged_voters=False)) == 1
    Archive(url).close()  # a second start finds the columns and changes nothing


def test_online_ranker_skips_flagged_votes(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    ranker = Ranker(client, k=4.0, config=ConsumerConfig())
    ranker.process(["1-0"], [vote("r1", "b", [IDENTITY_FLAG])])
    assert load_online(client) == {}
    ranker.process(["2-0"], [vote("r2", "b")])
    ratings = load_online(client)
    assert ratings["policy-v1"] > ratings["base"]


def test_a_vote_on_an_answer_naming_a_version_is_flagged_in_the_stream(settings):
    # Battles seeded as serve/battles.py stores them (no model server needed to vote).
    from test_serve_battles import session_cookie

    from serve.battles import BATTLE_KEY, battle_fields

    client = redis.Redis.from_url(settings.effective_redis_url)
    server = GatewayServer(settings.model_copy(update={"vllm_urls": ["http://127.0.0.1:9"],
                                                       "replica_sync_interval_s": 3600.0}))
    try:
        flags = {}
        for answer_b in ("I am policy-v1.", "I am a model."):
            battle_id = uuid.uuid4().hex
            battle = {"battle_id": battle_id, "session": "s1", "created_at": time.time(),
                      "model_a": "base", "model_b": "policy-v1",
                      "conversation_a": [USER, {"role": "assistant", "content": "Hi."}],
                      "conversation_b": [USER, {"role": "assistant", "content": answer_b}],
                      "answer_a": "Hi.", "answer_b": answer_b}
            client.hset(BATTLE_KEY.format(id=battle_id), mapping=battle_fields(battle))
            reply = httpx.post(f"{server.url}/v1/battles/{battle_id}/vote", json={"winner": "b"},
                               cookies=session_cookie(settings, "s1"))
            assert reply.status_code == 200, reply.text
            flags[answer_b] = battle_id
    finally:
        server.stop()
    stream = {VoteRecord.from_json(f[b"record"]).battle_id: VoteRecord.from_json(f[b"record"])
              for _, f in client.xrange(VOTES_STREAM)}
    assert stream[flags["I am policy-v1."]].flags == [IDENTITY_FLAG]
    assert stream[flags["I am a model."]].flags == []
