"""`arena consumers`: the consumer groups of the vote and chat streams in one process, a
thread each, until SIGTERM or SIGINT:

    archiver          votes  -> the archive (feedback/consumers.py)
    ranker            votes  -> online Elo; and, every refit_every_s, a Bradley-Terry refit
                                with bootstrap CIs from the archive's pair counts, then the
                                loop's decisions on the learner's candidates
                                (deploy/decision.py: promote, reject, roll back)
    voter-scorer      votes  -> each session's anomaly score
    learner-trigger   votes  -> a learner iteration every learn_every_votes
                                (learner/vote_trigger.py)
    chat-archiver     chats  -> the archive's chat turns (if settings.archive_chats)

and the stream housekeeping every HOUSEKEEPING_EVERY_S (feedback/consumers.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import redis

from core.settings import Settings
from deploy.decision import apply_decisions
from deploy.registry import Registry
from feedback.archive import Archive
from feedback.consumers import (
    ARCHIVER,
    CHAT_ARCHIVER,
    DB_TRANSIENT_ERRORS,
    FEEDBACK_CONSUMERS,
    HOUSEKEEPING_EVERY_S,
    RANKER,
    VOTER_SCORER,
    Archiver,
    ChatArchiver,
    Ranker,
    VoterScorer,
    consumer_config,
    housekeeping,
)
from feedback.refit import refit_ratings
from feedback.stream_consumer import REDIS_TRANSIENT_ERRORS, StreamConsumer
from learner.trigger import COUNTED_KEY
from learner.vote_trigger import GROUP as LEARNER_GROUP
from learner.vote_trigger import LearnerTrigger, Trigger

log = logging.getLogger("arena.feedback")
ALL_CONSUMERS = (*FEEDBACK_CONSUMERS, LEARNER_GROUP)
MAX_BACKOFF_S = 5.0


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
    if LEARNER_GROUP in names:
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
                housekeeping(client, archive, settings, also_forget=(COUNTED_KEY,))
        except REDIS_TRANSIENT_ERRORS + DB_TRANSIENT_ERRORS as error:
            log.warning("periodic: %s: %s", type(error).__name__, error)
        except Exception:
            log.exception("periodic task failed")
