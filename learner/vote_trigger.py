"""The learner-trigger consumer group on the vote stream: counts votes since the last learner
run (each vote id once), and at `learn_every_votes` starts an iteration
(`learner.trigger.start_iteration`) unless an iteration runs, learning is paused or a learner
candidate waits for its decision (`why_not_start`); the votes keep counting meanwhile.
`arena consumers` runs it beside the feedback consumers (arena/consumers.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from core.settings import Settings
from feedback.consumers import VoteConsumer, upgrade_seen_set
from feedback.stream_consumer import ConsumerConfig
from feedback.vote_record import VoteRecord
from learner.trigger import (
    COUNTED_KEY,
    LAST_TRIGGER_KEY,
    VOTES_WAITING_KEY,
    start_iteration,
    why_not_start,
)

log = logging.getLogger("arena.learner.trigger")
GROUP = "learner-trigger"

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
    so do those of a trigger that fails or answers "not started"."""

    def __init__(self, client: redis.Redis, settings: Settings, config: ConsumerConfig,
                 trigger: Trigger | None = None, name: str | None = None,
                 gate: Gate | None = None) -> None:
        super().__init__(client, GROUP, config, name)
        self.settings = settings
        self.trigger = trigger or start_iteration
        self.gate = gate or why_not_start
        self._count_new = client.register_script(_COUNT_NEW)
        self._take = client.register_script(_TAKE)
        self._blocked: str | None = None

    def ensure_group(self) -> None:
        super().ensure_group()
        upgrade_seen_set(self.client, COUNTED_KEY)

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        waiting = int(self._count_new(keys=[COUNTED_KEY, VOTES_WAITING_KEY],
                                      args=[repr(time.time()),
                                            *(record.vote_id for record in items)]))
        if waiting < self.settings.learn_every_votes:
            return
        if (blocked := self.gate(self.client)) is not None:
            if blocked != self._blocked:  # log once per reason, not once per vote batch
                log.info("learner trigger: %d votes waiting, not starting: %s", waiting, blocked)
            self._blocked = blocked
            return
        self._blocked = None
        log.info("learner trigger: %d new votes, starting a learner iteration", waiting)
        try:
            result = self.trigger(self.settings)
        except Exception:
            log.exception("learner trigger failed; its %d votes count again", waiting)
            return
        if not _started(result):
            log.info("learner trigger: not started (%s); the %d votes count toward the next "
                     "iteration", result.get("message"), waiting)
            return
        taken = int(self._take(keys=[VOTES_WAITING_KEY], args=[waiting]))
        self.client.set(LAST_TRIGGER_KEY, json.dumps({"ts": time.time(), "votes": taken}))


def votes_since_learner_run(client: redis.Redis) -> int:
    return int(client.get(VOTES_WAITING_KEY) or 0)


def reset_learner_count(client: redis.Redis) -> None:
    """For a learner run started by other means (an operator): count from zero again."""
    client.set(VOTES_WAITING_KEY, 0)
