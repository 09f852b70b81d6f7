"""The archive on SQLite and PostgreSQL: insert-or-ignore, reads, pair counts, prompts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from feedback.archive import Archive, ChatTurn
from testkit.synthetic_votes import synthetic_votes


@pytest.fixture(params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Archive:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'archive.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    archive = Archive(url)
    yield archive
    archive.close()


def test_votes_inserted_once(archive: Archive) -> None:
    votes = synthetic_votes(300, seed=1)
    assert archive.insert_votes(votes[:200], [f"1-{i}" for i in range(200)]) == 200
    # An overlapping batch, with a vote repeated inside it: only the 100 new ones count.
    assert archive.insert_votes(votes[150:] + votes[:3]) == 100
    assert archive.insert_votes(votes) == 0
    assert archive.count() == 300
    stored = list(archive.iter_votes())
    assert [s.record.vote_id for s in stored] == [v.vote_id for v in votes]  # oldest first
    assert stored[0].record == votes[0]
    assert stored[0].stream_entry_id == "1-0" and stored[250].stream_entry_id is None
    assert stored[0].archived_at >= votes[0].voted_at


def test_iter_votes_between(archive: Archive) -> None:
    votes = synthetic_votes(50, start=1_000_000.0, spacing_s=10.0)
    archive.insert_votes(votes)
    window = list(archive.iter_votes(since=1_000_100.0, until=1_000_200.0))
    assert [s.record.voted_at for s in window] == [1_000_100.0 + 10 * i for i in range(10)]
    assert archive.count_between(since=1_000_100.0, until=1_000_200.0) == 10
    assert archive.count_between(since=1_000_400.0) == 10


def test_pair_counts(archive: Archive) -> None:
    votes = synthetic_votes(400, seed=2)
    archive.insert_votes(votes)
    expected = Counter((v.model_a, v.model_b, v.winner) for v in votes)
    assert {(r.model_a, r.model_b, r.winner): r.n for r in archive.pair_counts()} == expected


def test_chat_turns_and_recent_prompts(archive: Archive) -> None:
    turns = [ChatTurn(f"{i}-0", "s1", "base", [{"role": "user", "content": f"chat {i}"}],
                      2_000_000.0 + i) for i in range(5)]
    assert archive.insert_chat_turns(turns) == 5
    assert archive.insert_chat_turns(turns[3:]) == 0
    assert archive.count_chat_turns() == 5
    archive.insert_votes(synthetic_votes(3, start=2_000_002.5, spacing_s=1.0, seed=3))
    prompts = archive.recent_prompts(4)
    assert len(prompts) == 4
    assert prompts[0][0]["content"].startswith("Tell me about")  # the vote at +4.5
    assert prompts[1] == [{"role": "user", "content": "chat 4"}]
    assert archive.recent_prompts(0) == []
