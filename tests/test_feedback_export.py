"""Export: TRL conversational preference records from the archive, as JSONL and Parquet,
through the function and through `arena export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arena.cli import app
from feedback.archive import Archive
from feedback.export import export_votes, preference_record
from feedback.vote_record import VoteRecord

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
USER = {"role": "user", "content": "Name a prime."}


def vote(battle_id: str, winner: str, minutes: int, **changes: object) -> VoteRecord:
    fields: dict[str, object] = dict(
        battle_id=battle_id, model_a="base", model_b="policy-v1", winner=winner,
        conversation_a=[USER], conversation_b=[USER], answer_a="2", answer_b="7",
        session="s1", battle_created_at=T0 + 60 * minutes - 5, voted_at=T0 + 60 * minutes,
    )
    fields.update(changes)
    return VoteRecord(**fields)


VOTES = [
    vote("v-a", "a", 0),
    vote("v-b", "b", 1),
    vote("v-tie", "tie", 2),
    vote("v-bad", "both_bad", 3),
    vote("v-follow", "b", 4,  # a follow-up turn: each side has its own history
         conversation_a=[USER, {"role": "assistant", "content": "2"},
                         {"role": "user", "content": "Another?"}],
         conversation_b=[USER, {"role": "assistant", "content": "7"},
                         {"role": "user", "content": "Another?"}],
         answer_a="3", answer_b="11"),
]


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive(f"sqlite:///{tmp_path / 'var' / 'archive.db'}")
    archive.insert_votes(VOTES)
    yield archive
    archive.close()


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_preference_records() -> None:
    a, b, tie, bad, follow = (preference_record(v) for v in VOTES)
    assert a["prompt"] == [USER] and a["chosen"] == assistant("2")
    assert a["rejected"] == assistant("7") and a["outcome"] == "a"
    assert (a["chosen_model"], a["rejected_model"]) == ("base", "policy-v1")
    assert b["chosen"] == assistant("7") and b["rejected"] == assistant("2")
    assert (b["chosen_model"], b["rejected_model"]) == ("policy-v1", "base")
    for record, outcome in ((tie, "tie"), (bad, "both_bad")):  # A then B, no preference
        assert record["outcome"] == outcome
        assert record["chosen"] == assistant("2") and record["rejected"] == assistant("7")
    assert follow["prompt"] == [USER]
    assert follow["chosen"] == [{"role": "assistant", "content": "7"},
                                {"role": "user", "content": "Another?"}] + assistant("11")
    assert follow["rejected"][0]["content"] == "2" and follow["rejected"][-1]["content"] == "3"
    assert a["voted_at"] == "2026-01-01T00:00:00Z"
    assert a["battle_created_at"] == "2025-12-31T23:59:55Z"
    assert a["battle_id"] == "v-a" and "session" not in a


def test_export_jsonl_window(archive: Archive, tmp_path: Path) -> None:
    output = tmp_path / "prefs.jsonl"
    assert export_votes(archive, output, "jsonl", since=T0 + 60, until=T0 + 240) == 3
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["battle_id"] for line in lines] == ["v-b", "v-tie", "v-bad"]
    assert lines == [preference_record(v) for v in VOTES[1:4]]


def test_export_parquet(archive: Archive, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "prefs.parquet"
    assert export_votes(archive, output, "parquet") == 5
    rows = pq.read_table(output).to_pylist()
    assert rows == [preference_record(v) for v in VOTES]


def test_arena_export_command(archive: Archive, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARENA_DATA_DIR", str(tmp_path / "var"))  # the default SQLite archive
    monkeypatch.delenv("ARENA_ARCHIVE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["export", "--format", "jsonl", "--output", str(output),
                                      "--since", "2026-01-01T00:02:00"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["battle_id"] for line in output.read_text().splitlines()] == [
        "v-tie", "v-bad", "v-follow"]
    bad = CliRunner().invoke(app, ["export", "--format", "csv", "--output", str(output)])
    assert bad.exit_code != 0
