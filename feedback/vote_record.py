"""The vote record: what a side-by-side vote carries from the gateway through the stream to
the archive, the ranker and the reward model. One JSON object per vote.

`conversation_a` / `conversation_b` are the chat messages each side answered (identical for a
one-turn battle; after follow-up turns each side has its own history), `answer_a` /
`answer_b` the final answers being judged, `winner` one of a / b / tie / both_bad. `flags`
name why a vote must not count (e.g. "identity": an answer named a version, so the voter may
have known the sides); a flagged vote is archived and exported, but left out of the ratings
and of reward-model training. `voter_address` is "" or a keyed hash of the client's address
(serve/voter_address.py, only behind a trusted proxy): the voter scorer adds the vote to that
address as well as to the session.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Winner = Literal["a", "b", "tie", "both_bad"]
WINNERS: tuple[Winner, ...] = ("a", "b", "tie", "both_bad")
Message = dict[str, str]
# Filled in when the vote arrives; everything else is known once both answers are finished.
OUTCOME_FIELDS = ("winner", "voted_at")


class MalformedVote(ValueError):
    """A stream entry that is not a valid vote record (it goes to the dead-letter stream)."""


@dataclass
class VoteRecord:
    battle_id: str  # also the vote id: one vote per battle, the idempotency key everywhere
    model_a: str
    model_b: str
    winner: Winner
    conversation_a: list[Message]
    conversation_b: list[Message]
    answer_a: str
    answer_b: str
    session: str
    battle_created_at: float
    voted_at: float = field(default_factory=time.time)
    flags: list[str] = field(default_factory=list)
    voter_address: str = ""

    @property
    def vote_id(self) -> str:
        return self.battle_id

    @property
    def voters(self) -> tuple[str, ...]:
        """Whom the vote is scored under: its session, and its address when one is known."""
        return (self.session, self.voter_address) if self.voter_address else (self.session,)

    @property
    def counts(self) -> bool:
        """Whether the vote counts in the ratings and in training (no flag)."""
        return not self.flags

    def to_json(self) -> str:
        # A shallow dict of the fields: the same JSON as asdict(), without its deep copy of
        # the conversations (3x faster; this runs once per vote on the gateway).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_json(cls, raw: str | bytes) -> VoteRecord:
        try:
            data: dict[str, Any] = json.loads(raw)
            record = cls(**data)
        except (TypeError, ValueError) as error:
            raise MalformedVote(f"not a vote record: {error}") from error
        if record.winner not in WINNERS:
            raise MalformedVote(f"winner {record.winner!r} is not one of {WINNERS}")
        if not isinstance(record.flags, list) or not all(isinstance(f, str) for f in record.flags):
            raise MalformedVote("flags must be a list of strings")
        if not isinstance(record.voter_address, str):
            raise MalformedVote("voter_address must be a string")
        if not record.battle_id or not record.model_a or not record.model_b:
            raise MalformedVote("battle_id, model_a and model_b must be non-empty")
        return record


def ballot_json(**record: Any) -> str:
    """The vote record of a finished battle minus its outcome (`winner`, `voted_at`), as JSON.
    The vote script in feedback/vote_stream.py appends the outcome inside Redis, so the hot
    vote path neither reads the battle back nor builds JSON."""
    expected = set(VoteRecord.field_names()) - set(OUTCOME_FIELDS)
    if set(record) != expected:
        raise TypeError(f"a ballot needs exactly {sorted(expected)}, got {sorted(record)}")
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def complete_ballot(ballot: str, winner: Winner, voted_at: float) -> str:
    """What the vote script does to a ballot, in Python (the same bytes): used by tests."""
    return f'{ballot[:-1]},"winner":"{winner}","voted_at":{voted_at!r}}}'
