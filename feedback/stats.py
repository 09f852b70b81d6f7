"""Figures of the vote pipeline for /healthz and Prometheus: stream length, pending and lag
per consumer group, dead letters, archived votes (the gateway adds the votes waiting for
the learner).

`stream_stats(client, archive)` is the synchronous, nested form (the archive's own count when
given); `stream_figures(client)` is what the gateway awaits on a `redis.asyncio` client: flat
numbers only, the archived count as the archiver last published it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from core.text import as_str
from feedback.vote_stream import (
    ARCHIVED_COUNT_KEY,
    CHATS_STREAM,
    DEAD_LETTER_STREAM,
    VOTES_STREAM,
)

if TYPE_CHECKING:  # the gateway imports this module without the archive's dependencies
    from feedback.archive import Archive


def _groups(raw: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
    return {
        as_str(group["name"]): {
            "pending": int(group["pending"]),
            "lag": None if group.get("lag") is None else int(group["lag"]),
            "consumers": int(group["consumers"]),
        }
        for group in raw
    }


def stream_stats(client: redis.Redis, archive: Archive | None = None) -> dict[str, Any]:
    """Nested figures: {"votes_stream": {"length", "groups": {name: {pending, lag,
    consumers}}}, "dead_letters", "chats_stream_length", "archived"}.
    """
    try:
        groups = _groups(client.xinfo_groups(VOTES_STREAM))
    except redis.ResponseError:  # the stream does not exist yet
        groups = {}
    archived = archive.count() if archive is not None else client.get(ARCHIVED_COUNT_KEY)
    return {
        "votes_stream": {"length": int(client.xlen(VOTES_STREAM)), "groups": groups},
        "dead_letters": int(client.xlen(DEAD_LETTER_STREAM)),
        "chats_stream_length": int(client.xlen(CHATS_STREAM)),
        "archived": int(archived or 0),
    }


async def stream_figures(client: Any) -> dict[str, float]:
    """Flat numeric figures for the gateway (`client` is a redis.asyncio.Redis):
    votes_stream_length, dead_letters, archived_votes, and
    pending_<group> / lag_<group> for each consumer group of the vote stream."""
    try:
        groups = _groups(await client.xinfo_groups(VOTES_STREAM))
    except redis.ResponseError:
        groups = {}
    figures: dict[str, float] = {
        "votes_stream_length": int(await client.xlen(VOTES_STREAM)),
        "dead_letters": int(await client.xlen(DEAD_LETTER_STREAM)),
        "archived_votes": int(await client.get(ARCHIVED_COUNT_KEY) or 0),
    }
    for name, group in groups.items():
        figures[f"pending_{name}"] = group["pending"]
        if group["lag"] is not None:
            figures[f"lag_{name}"] = group["lag"]
    return figures
