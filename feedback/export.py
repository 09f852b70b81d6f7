"""Export the archive as a preference dataset: one record per vote, in TRL's conversational
preference format (`prompt`, `chosen`, `rejected` as message lists), as JSON Lines or Parquet.

    prompt     the messages both answers replied to (for a follow-up battle whose two
               histories differ, their common prefix; each side's own later turns then open
               its `chosen` / `rejected` list)
    chosen     the preferred side's answer as an assistant message (a/b votes); for tie and
    rejected   both_bad, side A then side B, in that order, with no preference implied
    outcome    a / b / tie / both_bad, on every record: filter on it before training

plus battle_id, the models (model_a, model_b, chosen_model, rejected_model) and the
battle_created_at / voted_at timestamps (ISO 8601, UTC), and `flags` (a vote with a flag is left
out of ratings and training: feedback/identity.py). Sessions are not exported.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from feedback.archive import Archive, StoredVote, TimeBound
from feedback.vote_record import Message, VoteRecord

PARQUET_BATCH = 5000


class ExportFormat(enum.StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def preference_record(record: VoteRecord) -> dict[str, Any]:
    """The dataset record of one vote (see the module docstring)."""
    shared = _common_prefix(record.conversation_a, record.conversation_b)
    side = {
        "a": record.conversation_a[shared:] + [{"role": "assistant", "content": record.answer_a}],
        "b": record.conversation_b[shared:] + [{"role": "assistant", "content": record.answer_b}],
    }
    first, second = ("b", "a") if record.winner == "b" else ("a", "b")
    model = {"a": record.model_a, "b": record.model_b}
    return {
        "battle_id": record.battle_id,
        "prompt": record.conversation_a[:shared],
        "chosen": side[first],
        "rejected": side[second],
        "outcome": record.winner,
        "model_a": record.model_a,
        "model_b": record.model_b,
        "chosen_model": model[first],
        "rejected_model": model[second],
        "battle_created_at": _iso(record.battle_created_at),
        "voted_at": _iso(record.voted_at),
        "flags": list(record.flags),  # non-empty: left out of ratings and training
    }


def _write_jsonl(records: Iterable[dict[str, Any]], output: Path) -> None:
    with output.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_parquet(records: Iterable[dict[str, Any]], output: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise RuntimeError("Parquet export needs pyarrow: pip install pyarrow") from error
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([
        ("battle_id", pa.string()), ("prompt", messages), ("chosen", messages),
        ("rejected", messages), ("outcome", pa.string()), ("model_a", pa.string()),
        ("model_b", pa.string()), ("chosen_model", pa.string()), ("rejected_model", pa.string()),
        ("battle_created_at", pa.string()), ("voted_at", pa.string()),
        ("flags", pa.list_(pa.string())),
    ])
    with pq.ParquetWriter(output, schema) as writer:
        for batch in _batches(records, PARQUET_BATCH):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _batches(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def export_votes(
    archive: Archive,
    output: Path,
    fmt: ExportFormat | str = ExportFormat.jsonl,
    since: TimeBound = None,
    until: TimeBound = None,
    console: Console | None = None,
) -> int:
    """Write the votes with since <= voted_at < until to `output`; returns how many."""
    fmt = ExportFormat(fmt)
    total = archive.count_between(since, until)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    progress = Progress(TextColumn("exporting votes"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console or Console(stderr=True))

    def records(votes: Iterable[StoredVote]) -> Iterator[dict[str, Any]]:
        nonlocal written
        for vote in votes:
            written += 1
            progress.advance(task)
            yield preference_record(vote.record)

    with progress:
        task = progress.add_task("export", total=total)
        stream = records(archive.iter_votes(since, until))
        if fmt is ExportFormat.jsonl:
            _write_jsonl(stream, output)
        else:
            _write_parquet(stream, output)
    return written
