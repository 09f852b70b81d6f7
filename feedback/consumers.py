"""The feedback consumers, each a consumer group on a Redis stream:

    archiver          votes  -> the archive (insert-or-ignore on the vote id), then XACK
    ranker            votes  -> online Elo in Redis (once per vote id; elo/ratings_store.py)
    voter-scorer      votes  -> each session's anomaly score, copied to the archive
    chat-archiver     chats  -> the archive's chat turns (if settings.archive_chats)

`arena consumers` runs them (arena/consumers.py), with the learner's trigger and the
periodic Bradley-Terry refit beside them.

What they keep in Redis is bounded (`housekeeping`): the vote stream is trimmed to what
every group acknowledged (the archive has it), dead letters are capped, and the ids the
ranker and the learner trigger counted are forgotten after `stream_dedup_ttl_s`, longer
than a dead letter can be replayed (`stream_replay_window_s`), so a vote still counts once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from core.settings import Settings
from elo.ratings_store import APPLIED_KEY, OnlineVote, apply_online_votes
from feedback.archive import Archive, ChatTurn
from feedback.dead_letters import REPLAY_OF_FIELD
from feedback.erasure import drop_erased
from feedback.stream_consumer import (
    REDIS_TRANSIENT_ERRORS,
    ConsumerConfig,
    Entry,
    MalformedEntry,
    StreamConsumer,
    prune_idle_consumers,
    trim_acknowledged,
)
from feedback.vote_record import MalformedVote, VoteRecord
from feedback.vote_stream import (
    ARCHIVED_COUNT_KEY,
    CHATS_STREAM,
    RECORD_FIELD,
    VOTES_STREAM,
)
from feedback.voter_scores import APPLIED_KEY as VOTERS_APPLIED_KEY
from feedback.voter_scores import current_scores, record_scores, score_votes

log = logging.getLogger("arena.feedback")

ARCHIVER, RANKER, CHAT_ARCHIVER, VOTER_SCORER = (
    "archiver", "ranker", "chat-archiver", "voter-scorer")
FEEDBACK_CONSUMERS = (ARCHIVER, RANKER, CHAT_ARCHIVER, VOTER_SCORER)
HOUSEKEEPING_EVERY_S = 10.0
DB_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        batch_size=settings.stream_batch_size, block_ms=settings.stream_block_ms,
        claim_idle_ms=settings.stream_claim_idle_ms, max_deliveries=settings.stream_max_deliveries,
        dead_letter_maxlen=settings.stream_dead_letter_maxlen,
    )


# Older versions kept the counted ids in a plain set, forever: turn one into the sorted set,
# every id scored ARGV[1] (now), so it is forgotten one dedup window later. (ZUNIONSTORE
# reads a set member as score 1; the weight scales it.)
_UPGRADE_SET = """
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  return redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', ARGV[1])
end
return 0
"""


def upgrade_seen_set(client: redis.Redis, key: str) -> int:
    """Convert a legacy set of seen ids at `key` to the scored one; returns ids converted."""
    return int(client.eval(_UPGRADE_SET, 1, key, repr(time.time())))


def consumer_name(group: str) -> str:
    """Unique per process: a restarted process never mistakes a dead one's entries for its own
    in-flight ones (they are re-claimed after claim_idle_ms instead)."""
    return f"{group}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# --- votes ---------------------------------------------------------------------------------
class VoteConsumer(StreamConsumer[VoteRecord]):
    def __init__(self, client: redis.Redis, group: str, config: ConsumerConfig,
                 name: str | None = None) -> None:
        super().__init__(client, VOTES_STREAM, group, name or consumer_name(group), config)

    def parse(self, entry: Entry) -> VoteRecord:
        if RECORD_FIELD not in entry.fields:
            raise MalformedVote(f"no {RECORD_FIELD!r} field")
        return VoteRecord.from_json(entry.fields[RECORD_FIELD])


class Archiver(VoteConsumer):
    transient_errors = REDIS_TRANSIENT_ERRORS + DB_TRANSIENT_ERRORS

    def __init__(self, client: redis.Redis, archive: Archive, config: ConsumerConfig,
                 name: str | None = None) -> None:
        super().__init__(client, ARCHIVER, config, name)
        self.archive = archive

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        kept = drop_erased(self.client, items, lambda r: r.session, lambda r: r.voted_at)
        if len(kept) < len(items):  # votes of a session that asked for erasure meanwhile
            kept_ids = {id(r) for r in kept}
            entry_ids = [e for e, r in zip(entry_ids, items, strict=True) if id(r) in kept_ids]
            items = kept
        new = self.archive.insert_votes(items, entry_ids)
        if new:
            self.client.incrby(ARCHIVED_COUNT_KEY, new)


class Ranker(VoteConsumer):
    def __init__(self, client: redis.Redis, k: float, config: ConsumerConfig,
                 name: str | None = None) -> None:
        super().__init__(client, RANKER, config, name)
        self.k = k

    def ensure_group(self) -> None:
        super().ensure_group()
        upgrade_seen_set(self.client, APPLIED_KEY)

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        votes = [OnlineVote(r.vote_id, r.model_a, r.model_b, r.winner) for r in items
                 if r.counts]  # a flagged vote is archived but not rated
        apply_online_votes(self.client, votes, k=self.k)


class VoterScorer(VoteConsumer):
    """Each session's anomaly score, vote by vote (feedback/voter_scores.py), copied to the
    archive's `voters` table for the refit and the learner."""

    transient_errors = REDIS_TRANSIENT_ERRORS + DB_TRANSIENT_ERRORS

    def __init__(self, client: redis.Redis, archive: Archive, config: ConsumerConfig,
                 name: str | None = None) -> None:
        super().__init__(client, VOTER_SCORER, config, name)
        self.archive = archive

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        scores = score_votes(self.client, items)
        # Also the voters of votes scored before (a redelivery after the archive failed).
        record_scores(self.client, self.archive, {
            **current_scores(self.client, [v for r in items for v in r.voters]), **scores})


# --- chats ---------------------------------------------------------------------------------
class ChatArchiver(StreamConsumer[ChatTurn]):
    """Chat turns as the gateway adds them (session, model, ts, messages as JSON); the
    stream entry id is the turn id (a replayed turn keeps its first id), so a redelivered
    or replayed turn is stored once."""

    transient_errors = REDIS_TRANSIENT_ERRORS + DB_TRANSIENT_ERRORS

    def __init__(self, client: redis.Redis, archive: Archive, config: ConsumerConfig,
                 name: str | None = None) -> None:
        super().__init__(client, CHATS_STREAM, CHAT_ARCHIVER, name or consumer_name(CHAT_ARCHIVER),
                         config)
        self.archive = archive

    def parse(self, entry: Entry) -> ChatTurn:
        try:
            messages = json.loads(entry.fields["messages"])
            turn = ChatTurn(turn_id=entry.fields.get(REPLAY_OF_FIELD, entry.entry_id),
                            session=entry.fields["session"],
                            model=entry.fields["model"], messages=messages,
                            created_at=float(entry.fields["ts"]))
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedEntry(f"not a chat turn: {error!r}") from error
        if not isinstance(messages, list):
            raise MalformedEntry("messages is not a list")
        return turn

    def process(self, entry_ids: Sequence[str], items: Sequence[ChatTurn]) -> None:
        self.archive.insert_chat_turns(
            drop_erased(self.client, items, lambda t: t.session, lambda t: t.created_at))


def housekeeping(client: redis.Redis, archive: Archive, settings: Settings,
                 also_forget: Sequence[str] = ()) -> None:
    """Trim stream entries every group has acknowledged (they are in the archive), forget
    the vote ids counted longer ago than the dedup window (the ranker's, the voter scorer's
    and those of the sets in `also_forget`, e.g. the learner trigger's) and the consumers of
    dead processes, publish the archive's row count for the gateway."""
    trim_acknowledged(client, VOTES_STREAM, required_groups=(ARCHIVER,))
    trim_acknowledged(client, CHATS_STREAM, required_groups=(CHAT_ARCHIVER,))
    forget_before = time.time() - settings.stream_dedup_ttl_s
    for key in (APPLIED_KEY, VOTERS_APPLIED_KEY, *also_forget):
        upgrade_seen_set(client, key)
        client.zremrangebyscore(key, "-inf", f"({forget_before!r}")
    for stream in (VOTES_STREAM, CHATS_STREAM):
        prune_idle_consumers(client, stream)
    client.set(ARCHIVED_COUNT_KEY, archive.count())


