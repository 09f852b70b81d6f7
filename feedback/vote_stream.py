"""The vote stream in Redis: the gateway appends (XADD) and answers 2xx only after Redis has
the entry; consumer groups (archiver, ranker, learner trigger) read, and acknowledge only
after their work is done, so an accepted vote is never lost."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from core.text import as_str
from feedback.vote_record import VoteRecord, Winner

VOTES_STREAM = "arena:votes"
DEAD_LETTER_STREAM = "arena:votes:dead"
CHATS_STREAM = "arena:chats"
RECORD_FIELD = "record"
# Figures the consumers keep in Redis for the gateway (feedback/stats.py reads them).
ARCHIVED_COUNT_KEY = "arena:feedback:archived"  # rows in the archive, as last published


async def publish_vote(client: aioredis.Redis, record: VoteRecord) -> str:
    """XADD the vote; returns the stream entry id. Raises on a Redis error (the caller then
    answers 503 and the vote is not accepted)."""
    entry_id = await client.xadd(
        VOTES_STREAM, {RECORD_FIELD: record.to_json(), "battle_id": record.battle_id}
    )
    return as_str(entry_id)


def publish_vote_sync(client: redis.Redis, record: VoteRecord) -> str:
    entry_id = client.xadd(VOTES_STREAM, {RECORD_FIELD: record.to_json(),
                                          "battle_id": record.battle_id})
    return as_str(entry_id)


# The whole vote, checked and appended in one atomic script: one round-trip, one AOF fsync,
# no moment where a vote is marked as given but not in the stream (or the reverse).
#   KEYS: battle hash, voted guard, vote stream, per-session rate key, per-IP rate key
#   ARGV: session, winner, voted_at, guard TTL, session limit, IP limit, rate window TTL,
#         battle id
# The battle hash holds `session`, `model_a`, `model_b` and `ballot` (the record without its
# outcome, JSON ending in "}"; see vote_record.ballot_json); the script appends the outcome.
_ACCEPT_VOTE = """
for i = 1, 2 do
  local limit = tonumber(ARGV[4 + i])
  if limit > 0 then
    local count = redis.call('INCR', KEYS[3 + i])
    if count == 1 then redis.call('EXPIRE', KEYS[3 + i], ARGV[7]) end
    if count > limit then return {429, i} end
  end
end
local battle = redis.call('HMGET', KEYS[1], 'session', 'ballot', 'model_a', 'model_b')
if not battle[1] then return {404} end
if battle[1] ~= ARGV[1] then return {403} end
if not battle[2] then return {425} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[4]) then return {409} end
local record = string.sub(battle[2], 1, -2) ..
  ',"winner":"' .. ARGV[2] .. '","voted_at":' .. ARGV[3] .. '}'
local entry = redis.call('XADD', KEYS[3], '*', 'record', record, 'battle_id', ARGV[8])
return {200, entry, battle[3], battle[4]}
"""
VOTE_SCRIPT_KEYS = 5


@dataclass(frozen=True)
class VoteOutcome:
    """What the vote script decided: 200 (accepted: `entry_id`, `model_a`, `model_b`),
    404 no such battle, 403 another session's battle, 425 answers not finished, 409 already
    voted, 429 over a rate limit (`limited_by` = "session" or "ip")."""

    status: int
    entry_id: str = ""
    model_a: str = ""
    model_b: str = ""
    limited_by: str = ""


@dataclass(frozen=True)
class VoteKeys:
    battle: str
    voted: str
    session_rate: str
    ip_rate: str


class VoteAcceptor:
    """Runs the vote script for one gateway process, with group commit: votes that arrive
    while a round-trip is in flight wait and go out together as one pipeline (one write, one
    reply read, one AOF fsync), so a burst costs a few round-trips, not one per vote. Each
    vote still gets its own script run and its own answer."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._sha = hashlib.sha1(_ACCEPT_VOTE.encode()).hexdigest()
        self._waiting: list[tuple[list[str | int], asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    async def accept(self, keys: VoteKeys, battle_id: str, session: str, winner: Winner,
                     guard_ttl_s: int, session_limit: int, ip_limit: int,
                     rate_window_s: int) -> VoteOutcome:
        """Raises on a Redis error; the caller answers 503. (If the error came after Redis ran
        the script, the vote is in the stream and a retry is told 409: never lost, never
        counted twice.)"""
        args: list[str | int] = [
            keys.battle, keys.voted, VOTES_STREAM, keys.session_rate, keys.ip_rate,
            session, winner, repr(time.time()), guard_ttl_s, session_limit, ip_limit,
            rate_window_s, battle_id]
        reply = asyncio.get_running_loop().create_future()
        self._waiting.append((args, reply))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting())
        return _outcome(await reply)

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                replies = await self._run([args for args, _ in batch])
            except Exception as error:  # noqa: BLE001 - every waiter gets the error
                replies = [error] * len(batch)
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():  # the request was cancelled (client gone)
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _run(self, batch: list[list[str | int]]) -> list:
        replies = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted (scripts are not persisted): load it and re-run those votes;
            # a NOSCRIPT reply means the script did not run, so this cannot double-count.
            await self._client.script_load(_ACCEPT_VOTE)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for i, reply in zip(missing, await self._pipeline([batch[i] for i in missing]),
                                strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list[list[str | int]]) -> list:
        pipe = self._client.pipeline(transaction=False)
        for args in batch:
            pipe.evalsha(self._sha, VOTE_SCRIPT_KEYS, *args)
        return await pipe.execute(raise_on_error=False)


def _outcome(reply: list) -> VoteOutcome:
    status = int(reply[0])
    if status == 200:
        entry_id, model_a, model_b = (as_str(v) for v in reply[1:4])
        return VoteOutcome(200, entry_id, model_a, model_b)
    if status == 429:
        return VoteOutcome(429, limited_by="session" if int(reply[1]) == 1 else "ip")
    return VoteOutcome(status)
