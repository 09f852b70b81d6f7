"""The feedback consumers, each a consumer group on a Redis stream:

    archiver          votes  -> the archive (insert-or-ignore on the vote id), then XACK
    ranker            votes  -> online Elo in Redis (once per vote id); and, every
                                refit_every_s, a Bradley-Terry refit with bootstrap CIs from
                                the archive's pair counts (elo/ratings_store.py keeps both),
                                then the loop's decisions on the learner's candidates
                                (deploy/decision.py: promote, reject, roll back)
    learner-trigger   votes  -> counts votes since the last learner run; at learn_every_votes
                                calls `learner.trigger.start_iteration(settings)` unless an
                                iteration runs, learning is paused or a learner candidate
                                waits for its decision (the votes keep counting meanwhile)
    chat-archiver     chats  -> the archive's chat turns (if settings.archive_chats)

`run_consumers(settings)` runs them in one process, a thread each, until SIGTERM or SIGINT
(`arena consumers`). `python -m feedback.consumers archiver ranker` runs a subset.

What they keep in Redis is bounded (`housekeeping`): the vote stream is trimmed to what
every group acknowledged (the archive has it), dead letters are capped, and the ids the
ranker and the learner trigger counted are forgotten after `stream_dedup_ttl_s`, longer
than a dead letter can be replayed (`stream_replay_window_s`), so a vote still counts once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from arena.settings import Settings
from deploy.decision import apply_decisions
from deploy.registry import Registry
from elo.ratings_store import APPLIED_KEY, OnlineVote, apply_online_votes
from feedback.archive import Archive, ChatTurn
from feedback.dead_letters import REPLAY_OF_FIELD
from feedback.erasure import drop_erased
from feedback.refit import refit_ratings
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
    LEARNER_VOTES_KEY,
    RECORD_FIELD,
    VOTES_STREAM,
)
from feedback.voter_scores import APPLIED_KEY as VOTERS_APPLIED_KEY
from feedback.voter_scores import current_scores, record_scores, score_votes

log = logging.getLogger("arena.feedback")

ARCHIVER, RANKER, LEARNER_TRIGGER, CHAT_ARCHIVER, VOTER_SCORER = (
    "archiver", "ranker", "learner-trigger", "chat-archiver", "voter-scorer")
ALL_CONSUMERS = (ARCHIVER, RANKER, LEARNER_TRIGGER, CHAT_ARCHIVER, VOTER_SCORER)

LEARNER_COUNTED_KEY = "arena:learner:counted"  # zset: vote ids counted, scored by when
LEARNER_LAST_TRIGGER_KEY = "arena:learner:last_trigger"
TRIGGER_FUNCTION = ("learner.trigger", "start_iteration")
GATE_FUNCTION = ("learner.trigger", "why_not_start")
HOUSEKEEPING_EVERY_S = 10.0
MAX_BACKOFF_S = 5.0
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


Trigger = Callable[[Settings], Any]

# Count each vote id once (KEYS[1]: the ids counted, a zset scored by when, forgotten after
# the dedup window; KEYS[2]: votes since the last run; ARGV[1]: now, ARGV[2..]: the ids).
_COUNT_NEW = """
local new = 0
for i = 2, #ARGV do new = new + redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i]) end
if new > 0 then return redis.call('INCRBY', KEYS[2], new) end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""
# Take the ARGV[1] votes an iteration was started for (never below 0): votes counted since
# stay for the next one.
_TAKE = """
local waiting = tonumber(redis.call('GET', KEYS[1]) or '0')
local taken = math.min(waiting, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], waiting - taken)
return taken
"""
Gate = Callable[[redis.Redis], str | None]


def _started(result: Any) -> bool:
    """A trigger's answer: start_iteration's {"started": bool, ...}; any other = started."""
    return not isinstance(result, dict) or bool(result.get("started", True))


class LearnerTrigger(VoteConsumer):
    """Counts votes since the last learner run, each vote id once however often it is
    delivered; at learn_every_votes, unless the gate says no (an iteration runs, learning is
    paused, a learner candidate waits for its decision: `learner.trigger.why_not_start`), it
    calls the trigger, and only when that started an iteration takes the votes counted
    (back towards 0). Votes that arrive while it cannot start count toward the next one;
    so do those of a trigger that fails or answers "not started". Without a trigger (the
    learner's `learner.trigger.start_iteration` not installed) the votes keep counting."""

    def __init__(self, client: redis.Redis, settings: Settings, config: ConsumerConfig,
                 trigger: Trigger | None = None, name: str | None = None,
                 gate: Gate | None = None) -> None:
        super().__init__(client, LEARNER_TRIGGER, config, name)
        self.settings = settings
        self.trigger = trigger
        self.gate = gate
        self._count_new = client.register_script(_COUNT_NEW)
        self._take = client.register_script(_TAKE)
        self._warned_missing = False
        self._blocked: str | None = None

    def ensure_group(self) -> None:
        super().ensure_group()
        upgrade_seen_set(self.client, LEARNER_COUNTED_KEY)

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        waiting = int(self._count_new(keys=[LEARNER_COUNTED_KEY, LEARNER_VOTES_KEY],
                                      args=[repr(time.time()),
                                            *(record.vote_id for record in items)]))
        if waiting < self.settings.learn_every_votes:
            return
        trigger = self.trigger or self._find_trigger()
        if trigger is None:
            return
        gate = self.gate or self._find(GATE_FUNCTION)
        if gate is not None and (blocked := gate(self.client)) is not None:
            if blocked != self._blocked:  # log once per reason, not once per vote batch
                log.info("learner trigger: %d votes waiting, not starting: %s", waiting, blocked)
            self._blocked = blocked
            return
        self._blocked = None
        log.info("learner trigger: %d new votes, starting a learner iteration", waiting)
        try:
            result = trigger(self.settings)
        except Exception:
            log.exception("learner trigger failed; its %d votes count again", waiting)
            return
        if not _started(result):
            log.info("learner trigger: not started (%s); the %d votes count toward the next "
                     "iteration", result.get("message"), waiting)
            return
        taken = int(self._take(keys=[LEARNER_VOTES_KEY], args=[waiting]))
        self.client.set(LEARNER_LAST_TRIGGER_KEY, json.dumps({"ts": time.time(), "votes": taken}))

    def _find_trigger(self) -> Trigger | None:
        return self._find(TRIGGER_FUNCTION)

    def _find(self, where: tuple[str, str]) -> Any:
        module_name, function_name = where
        importlib.invalidate_caches()
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            if not self._warned_missing:
                log.warning("learner trigger: %s.%s is not available (%s); votes keep "
                            "counting until it is", module_name, function_name, error)
                self._warned_missing = True
            return None
        return function


def votes_since_learner_run(client: redis.Redis) -> int:
    return int(client.get(LEARNER_VOTES_KEY) or 0)


def reset_learner_count(client: redis.Redis) -> None:
    """For a learner run started by other means (an operator): count from zero again."""
    client.set(LEARNER_VOTES_KEY, 0)


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


# --- running them --------------------------------------------------------------------------
def run_consumers(
    settings: Settings,
    only: Collection[str] | None = None,
    stop: threading.Event | None = None,
    trigger: Trigger | None = None,
) -> None:
    """Run the consumers (all, or those named in `only`) until SIGTERM/SIGINT or `stop`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = set(only or ALL_CONSUMERS)
    if unknown := names - set(ALL_CONSUMERS):
        raise ValueError(f"unknown consumers {sorted(unknown)}; choose from {ALL_CONSUMERS}")
    if not settings.archive_chats:
        names.discard(CHAT_ARCHIVER)
    stop = stop or threading.Event()
    client = redis.Redis.from_url(settings.effective_redis_url, health_check_interval=30)
    archive = Archive(settings.effective_archive_url)
    config = consumer_config(settings)
    consumers: list[StreamConsumer[Any]] = []
    if ARCHIVER in names:
        consumers.append(Archiver(client, archive, config))
    if RANKER in names:
        consumers.append(Ranker(client, settings.elo_k, config))
    if LEARNER_TRIGGER in names:
        consumers.append(LearnerTrigger(client, settings, config, trigger))
    if CHAT_ARCHIVER in names:
        consumers.append(ChatArchiver(client, archive, config))
    if VOTER_SCORER in names:
        consumers.append(VoterScorer(client, archive, config))

    restore = _stop_on_signals(stop)
    threads = [threading.Thread(target=_consume_loop, args=(c, stop), name=c.group, daemon=True)
               for c in consumers]
    threads.append(threading.Thread(
        target=_periodic_loop, args=(settings, client, archive, RANKER in names, stop),
        name="periodic", daemon=True))
    log.info("feedback consumers running: %s", ", ".join(c.name for c in consumers))
    for thread in threads:
        thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=settings.stream_block_ms / 1000 + 30)
        restore()
        archive.close()
        client.close()
        log.info("feedback consumers stopped")


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set `stop` (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _consume_loop(consumer: StreamConsumer[Any], stop: threading.Event) -> None:
    backoff = 0.0
    ready = False
    while not stop.is_set():
        try:
            if not ready:
                consumer.ensure_group()
                ready = True
            consumer.run_once()
            backoff = 0.0
        except consumer.transient_errors as error:
            backoff = min(max(backoff * 2, 0.1), MAX_BACKOFF_S)
            log.warning("%s: %s: %s; retrying in %.1fs", consumer.group, type(error).__name__,
                        error, backoff)
            stop.wait(backoff)
        except Exception:
            log.exception("%s: unexpected error; retrying in 1s", consumer.group)
            stop.wait(1.0)


def _periodic_loop(settings: Settings, client: redis.Redis, archive: Archive, refit: bool,
                   stop: threading.Event) -> None:
    """Bradley-Terry refits and, right after each, the loop's decisions (when the ranker
    runs here); stream housekeeping."""
    registry = Registry(client, settings.data_dir / "audit.log")
    next_refit = next_housekeeping = time.monotonic()
    while not stop.wait(0.5):
        now = time.monotonic()
        try:
            if refit and now >= next_refit:
                next_refit = now + settings.refit_every_s
                refit_ratings(client, archive, settings.bt_bootstrap_rounds,
                              flagged_votes=settings.flagged_votes,
                              flagged_weight=settings.flagged_vote_weight)
                apply_decisions(client, registry, settings)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_EVERY_S
                housekeeping(client, archive, settings)
        except REDIS_TRANSIENT_ERRORS + DB_TRANSIENT_ERRORS as error:
            log.warning("periodic: %s: %s", type(error).__name__, error)
        except Exception:
            log.exception("periodic task failed")


def housekeeping(client: redis.Redis, archive: Archive, settings: Settings) -> None:
    """Trim stream entries every group has acknowledged (they are in the archive), forget
    the vote ids counted longer ago than the dedup window and the consumers of dead
    processes, publish the archive's row count for the gateway."""
    trim_acknowledged(client, VOTES_STREAM, required_groups=(ARCHIVER,))
    trim_acknowledged(client, CHATS_STREAM, required_groups=(CHAT_ARCHIVER,))
    forget_before = time.time() - settings.stream_dedup_ttl_s
    for key in (APPLIED_KEY, LEARNER_COUNTED_KEY, VOTERS_APPLIED_KEY):
        upgrade_seen_set(client, key)
        client.zremrangebyscore(key, "-inf", f"({forget_before!r}")
    for stream in (VOTES_STREAM, CHATS_STREAM):
        prune_idle_consumers(client, stream)
    client.set(ARCHIVED_COUNT_KEY, archive.count())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run feedback consumers (settings: ARENA_*).")
    parser.add_argument("consumers", nargs="*", metavar="CONSUMER",
                        help=f"any of {', '.join(ALL_CONSUMERS)} (default: all)")
    args = parser.parse_args(argv)
    run_consumers(Settings(), only=args.consumers or None)


if __name__ == "__main__":
    main()
