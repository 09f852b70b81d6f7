"""The vote stream in Redis: the gateway appends (XADD) and answers 2xx only after Redis has
the entry; consumer groups (archiver, ranker, learner trigger) read, and acknowledge only
after their work is done, so an accepted vote is never lost."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from feedback.vote_record import VoteRecord

VOTES_STREAM = "arena:votes"
DEAD_LETTER_STREAM = "arena:votes:dead"
CHATS_STREAM = "arena:chats"
RECORD_FIELD = "record"
# Figures the consumers keep in Redis for the gateway (feedback/stats.py reads them).
ARCHIVED_COUNT_KEY = "arena:feedback:archived"  # rows in the archive, as last published
LEARNER_VOTES_KEY = "arena:learner:votes_since_run"  # votes counted since the last run


async def publish_vote(client: aioredis.Redis, record: VoteRecord) -> str:
    """XADD the vote; returns the stream entry id. Raises on a Redis error (the caller then
    answers 503 and the vote is not accepted)."""
    entry_id = await client.xadd(
        VOTES_STREAM, {RECORD_FIELD: record.to_json(), "battle_id": record.battle_id}
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def publish_vote_sync(client: redis.Redis, record: VoteRecord) -> str:
    entry_id = client.xadd(VOTES_STREAM, {RECORD_FIELD: record.to_json(),
                                          "battle_id": record.battle_id})
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
