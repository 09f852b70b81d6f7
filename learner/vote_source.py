"""Where the learner reads votes from: a small interface with two implementations, the
preference archive (feedback/archive.py) and a JSONL file of VoteRecord JSON (one per line,
the same record format; used by tests and before an archive exists)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from feedback.vote_record import MalformedVote, VoteRecord
from learner.prompt_pool import is_text_conversation

log = logging.getLogger(__name__)


class VoteSource(Protocol):
    def votes(self, until: float | None = None) -> list[VoteRecord]:
        """All votes with voted_at < until (None = all), oldest first."""
        ...

    def describe(self) -> str: ...


@dataclass
class JsonlVoteSource:
    path: Path

    def votes(self, until: float | None = None) -> list[VoteRecord]:
        records, malformed = [], 0
        with Path(self.path).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        record = VoteRecord.from_json(line)
                    except MalformedVote:
                        malformed += 1
                        continue
                    if until is None or record.voted_at < until:
                        records.append(record)
        if malformed:
            log.warning("votes: skipped %d malformed lines of %s", malformed, self.path)
        return text_votes(sorted(records, key=lambda r: (r.voted_at, r.vote_id)))

    def describe(self) -> str:
        return f"jsonl:{self.path}"


@dataclass
class ArchiveVoteSource:
    url: str
    flagged_votes: str = "exclude"  # votes of the voters the scorer flagged (settings)
    flagged_weight: float = 0.1

    def votes(self, until: float | None = None) -> list[VoteRecord]:
        from feedback.archive import Archive

        archive = Archive(self.url)
        try:
            records = [stored.record for stored in archive.iter_votes(until=until)]
            flagged = archive.flagged_voters() if self.flagged_votes != "keep" else {}
        finally:
            archive.close()
        kept = [r for r in records if flagged.keys().isdisjoint(r.voters) or (
            self.flagged_votes == "downweight" and _kept_share(r.vote_id) < self.flagged_weight)]
        if len(kept) < len(records):
            log.info("votes: left out %d votes of %d flagged voters (%s)",
                     len(records) - len(kept), len(flagged), self.flagged_votes)
        return text_votes(kept)

    def describe(self) -> str:
        return "archive"


def _kept_share(vote_id: str) -> float:
    """A stable number in [0, 1) per vote: a down-weighted vote is kept when it is below the
    weight, so the reward model trains on that share of a flagged session's votes, the same
    ones run after run."""
    return int(hashlib.sha256(vote_id.encode()).hexdigest()[:8], 16) / 2**32


def text_votes(records: list[VoteRecord]) -> list[VoteRecord]:
    """The votes the learner can train on: votes that count (no flag, see VoteRecord.flags),
    with conversations and answers of text. One vote with other content (a list of parts,
    archived by an older gateway) would otherwise stop every reward-model run at
    tokenisation; it is skipped and counted."""
    counting = [r for r in records if r.counts]
    if len(counting) < len(records):
        log.info("votes: left out %d of %d flagged votes", len(records) - len(counting),
                 len(records))
    kept = [r for r in counting
            if is_text_conversation(r.conversation_a) and is_text_conversation(r.conversation_b)
            and isinstance(r.answer_a, str) and isinstance(r.answer_b, str)]
    if len(kept) < len(counting):
        log.warning("votes: skipped %d of %d votes whose content is not text",
                    len(counting) - len(kept), len(counting))
    return kept


def write_jsonl(path: Path, records: list[VoteRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return path


def vote_source(settings: Any, votes_jsonl: str | Path | None = None) -> VoteSource:
    """The JSONL file when one is named (argument or `learner_votes_jsonl`), else the archive."""
    path = votes_jsonl or getattr(settings, "learner_votes_jsonl", None)
    if path:
        return JsonlVoteSource(Path(path))
    return ArchiveVoteSource(settings.effective_archive_url,
                             settings.flagged_votes, settings.flagged_vote_weight)


def data_range(records: list[VoteRecord], source: str, until: float | None) -> dict[str, Any]:
    """What a trained artefact was trained on, for its manifest."""
    return {
        "source": source,
        "n_votes": len(records),
        "first_voted_at": records[0].voted_at if records else None,
        "last_voted_at": records[-1].voted_at if records else None,
        "first_vote_id": records[0].vote_id if records else None,
        "last_vote_id": records[-1].vote_id if records else None,
        "until": until,
        "winners": {w: sum(r.winner == w for r in records) for w in ("a", "b", "tie", "both_bad")},
        "self_pairs": sum(r.model_a == r.model_b for r in records),
    }
