"""A session's right to erase what it sent (`DELETE /v1/session/data`).

The gateway first marks the session erased up to now (a Redis key holding the time, kept
longer than any stream entry lives), then deletes the session's archived chat turns and votes.
The archivers drop, from then on, any record of a marked session made before its mark: a vote
or chat turn still in a stream when the request came is never archived afterwards. What the
session sends after the erasure is kept as usual. Votes a published version was already
trained on stay described by that version's data range (its manifest); the version itself is
not retrained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

from core.text import as_str

ERASED_KEY = "arena:session:{session}:erased"
ERASED_TTL_S = 30 * 86_400  # longer than a stream entry can wait to be archived

Item = TypeVar("Item")


def erased_key(session: str) -> str:
    return ERASED_KEY.format(session=session)


def drop_erased(client: redis.Redis, items: Sequence[Item], session_of: Callable[[Item], str],
                time_of: Callable[[Item], float]) -> list[Item]:
    """`items` minus those of an erased session made at or before its erasure."""
    sessions = sorted({session_of(item) for item in items})
    if not sessions:
        return list(items)
    marks = client.mget([erased_key(s) for s in sessions])
    erased_at = {s: float(as_str(m)) for s, m in zip(sessions, marks, strict=True) if m}
    if not erased_at:
        return list(items)
    return [item for item in items if time_of(item) > erased_at.get(session_of(item), -1.0)]
