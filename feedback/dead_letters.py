"""Dead letters: stream entries a consumer group could never process. The consumers move
them to `arena:votes:dead` with the reason (feedback/stream_consumer.py; capped at
`stream_dead_letter_maxlen`); `arena dead-letters list|replay` shows them and puts them back.

A replay re-queues the original fields into the stream they came from and deletes the dead
letter, in one MULTI, so a replay that is interrupted or repeated never queues an entry
twice. Even an entry queued twice counts once: the archive inserts a vote id once, ever, and
the ranker and the learner trigger remember the ids they counted for `stream_dedup_ttl_s`.
That is why only entries younger than `stream_replay_window_s` (less than the dedup window)
are replayed, measured from when the gateway first queued them: an id counted since then is
still remembered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import redis

from core.text import as_str
from feedback.vote_stream import CHATS_STREAM, DEAD_LETTER_STREAM, VOTES_STREAM

REPLAYABLE_STREAMS = (VOTES_STREAM, CHATS_STREAM)
REPLAY_OF_FIELD = "replay_of"  # on a replayed entry: the id it had when first queued


@dataclass(frozen=True)
class DeadLetter:
    id: str  # its entry id in the dead-letter stream
    original_id: str  # the entry id it had in `stream`
    stream: str
    group: str
    reason: str
    deliveries: int
    dead_at: float
    fields: dict[str, str]  # the original entry's fields

    @property
    def first_id(self) -> str:
        """The id the entry had when the gateway first queued it (before any replay)."""
        return self.fields.get(REPLAY_OF_FIELD, self.original_id)

    @property
    def queued_at(self) -> float:
        """When the entry was first queued (Unix seconds): the time part of that id."""
        return int(self.first_id.partition("-")[0]) / 1000

    @classmethod
    def from_entry(cls, entry_id: bytes | str, raw: dict[bytes, bytes]) -> DeadLetter:
        values = {as_str(key): as_str(value) for key, value in raw.items()}
        return cls(id=as_str(entry_id), original_id=values["original_id"],
                   stream=values["stream"], group=values["group"], reason=values["reason"],
                   deliveries=int(values["deliveries"]), dead_at=float(values["dead_at"]),
                   fields=json.loads(values["fields"]))


@dataclass
class ReplayResult:
    replayed: dict[str, str] = field(default_factory=dict)  # original id -> its new entry id
    skipped: dict[str, str] = field(default_factory=dict)  # dead-letter id -> why


def list_dead_letters(client: redis.Redis, count: int | None = None) -> list[DeadLetter]:
    """The newest `count` dead letters (all if None), oldest first."""
    entries = client.xrevrange(DEAD_LETTER_STREAM, count=count)
    return [DeadLetter.from_entry(entry_id, raw) for entry_id, raw in reversed(entries)]


def replay_dead_letters(client: redis.Redis, window_s: float,
                        ids: Collection[str] | None = None,
                        now: float | None = None) -> ReplayResult:
    """Re-queue the dead letters named by `ids` (all if None) into their streams, one entry
    per original entry (each group dead-letters its own copy), and delete them. Skipped, and
    left in place: entries older than `window_s`, malformed ones (they would only come back),
    and entries of a stream that is not ours."""
    now = time.time() if now is None else now
    letters = list_dead_letters(client)
    if ids is not None:
        wanted = set(ids)
        letters = [letter for letter in letters if letter.id in wanted]
    result = ReplayResult()
    originals: dict[tuple[str, str], list[DeadLetter]] = {}
    for letter in letters:
        if letter.stream not in REPLAYABLE_STREAMS:
            result.skipped[letter.id] = f"from {letter.stream!r}, not a stream of ours"
        elif letter.reason.startswith("malformed"):
            result.skipped[letter.id] = f"{letter.reason} (a replay would fail again)"
        elif now - letter.queued_at > window_s:
            result.skipped[letter.id] = (
                f"queued {(now - letter.queued_at) / 86400:.1f} days ago, older than the replay "
                "window: its id may be forgotten, so a replay could count it twice")
        else:
            originals.setdefault((letter.stream, letter.original_id), []).append(letter)
    for (stream, original_id), copies in originals.items():
        with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {**copies[0].fields, REPLAY_OF_FIELD: copies[0].first_id})
            pipe.xdel(DEAD_LETTER_STREAM, *(letter.id for letter in copies))
            new_id, _deleted = pipe.execute()
        result.replayed[original_id] = as_str(new_id)
    return result
