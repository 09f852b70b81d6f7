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


# Accept a battle's vote at most once, atomically: the guard key and the stream entry are
# written by one script, so there is no moment where a vote is marked as given but not in
# the stream (or the reverse), and the gateway pays one round-trip and one AOF fsync.
_ACCEPT_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[2], '*', 'record', ARGV[3], 'battle_id', ARGV[4])
end
return false
"""


async def publish_vote_once(client: aioredis.Redis, record: VoteRecord, guard_key: str,
                            guard_ttl_s: int) -> str | None:
    """XADD the vote unless `guard_key` exists; returns the entry id, or None if this battle
    already has a vote. Raises on a Redis error (then nothing was written)."""
    entry_id = await client.eval(_ACCEPT_ONCE, 2, guard_key, VOTES_STREAM, record.winner,
                                 guard_ttl_s, record.to_json(), record.battle_id)
    if entry_id is None:
        return None
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
