"""Celery tasks of the learner: train the reward model, train the policy, or both in one
iteration. They run on the learner worker (`celery -A learner.worker:app worker`), with
`acks_late` (celery_app.py): a worker killed mid-task gets the task re-delivered with the
same id, and the pipeline (learner/pipeline.py) is idempotent on that id: published
versions are not written twice, a policy run resumes from its last checkpoint, and nothing
half-written is ever visible under a version name.

Progress goes to the task state (`PROGRESS`, meta: phase, step, total, reward, kl, eta_s …)
and to the log (a line per phase change, final step, or every LOG_EVERY_S). An iteration
cancelled by an operator (learner.trigger.cancel_iteration) stops at its next progress
update even if the worker could not kill it.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from celery import current_app, shared_task

from core.settings import Settings

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0  # at most one state update a second (the RM reports per batch)
LOG_EVERY_S = 10.0  # at most one progress log line per 10 s (and one per phase change)
LOGGED_FIELDS = ("reward", "kl", "loss", "eta_s")


class IterationCancelled(Exception):
    """An operator cancelled this iteration."""


def _settings() -> Settings:
    """The worker's settings, read once at its start (learner/worker.py)."""
    return current_app.conf.arena_settings


def progress_line(meta: dict[str, Any]) -> str:
    """'phase policy step 3/10 reward 0.120 kl 0.310 loss 0.0100 eta_s 42'."""
    parts = [f"phase {meta.get('phase')}", f"step {meta.get('step')}/{meta.get('total')}"]
    parts += [f"{k} {meta[k]:.3g}" for k in LOGGED_FIELDS if isinstance(meta.get(k), int | float)]
    return " ".join(parts)


class _Reporter:
    """Progress callback: Celery state + log, throttled; renews the iteration lock, and
    stops the iteration (IterationCancelled) once an operator cancelled it, or (LockLost)
    once this delivery no longer holds the lock (`guard`, also called before each
    checkpoint write and publish)."""

    def __init__(self, task: Any, lock: Any = None, token: str | None = None,
                 fence: str | None = None) -> None:
        self.task, self.lock, self.token, self.fence = task, lock, token, fence
        self.last = 0.0
        self.last_log = 0.0
        self.phase: Any = None

    def __call__(self, meta: dict[str, Any]) -> None:
        now = time.monotonic()
        final = meta.get("step") == meta.get("total")
        new_phase = meta.get("phase") != self.phase
        if (now - self.last < PROGRESS_EVERY_S and not final and not new_phase
                and meta.get("phase") != "policy"):
            return
        self.last = now
        clean = {k: v for k, v in meta.items() if isinstance(v, int | float | str) or v is None}
        if self.task.request.id is not None:  # not when called eagerly without a task id
            self.task.update_state(state="PROGRESS", meta=clean)
        if new_phase or final or now - self.last_log >= LOG_EVERY_S:
            self.last_log, self.phase = now, meta.get("phase")
            log.info("learner progress (task %s): %s", self.task.request.id, progress_line(clean))
        if self.lock is not None and self.token is not None:
            from learner.trigger import was_cancelled

            if was_cancelled(self.lock.redis, self.token):
                raise IterationCancelled(f"iteration {self.token} was cancelled")
            self.guard()

    def guard(self) -> None:
        """Raise LockLost unless this delivery still holds the lock (renewing it)."""
        from learner.trigger import LockLost

        if self.lock is None or self.token is None or self.fence is None:
            return
        if not self.lock.check(self.token, self.fence):
            raise LockLost(f"iteration {self.token} lost its lock (fencing token {self.fence}; "
                           f"holder now {self.lock.holder()})")


def _reward_model(settings: Settings, task_id: str, votes_jsonl: str | None,
                  reporter: _Reporter, registry: Any, guard: Any = None) -> dict[str, Any]:
    """The reward-model phase: in this process, or with learner_processes > 1 as that many
    data-parallel processes (learner/launch.py) reporting to this task."""
    if settings.learner_processes > 1:
        from learner.launch import run_launched

        return run_launched(settings, "reward", task_id, votes_jsonl=votes_jsonl,
                            **_launch_context(reporter))
    from learner.pipeline import run_reward_model

    return run_reward_model(settings, task_id, votes_jsonl, reporter, registry, guard=guard)


def _policy(settings: Settings, task_id: str, rm_version: str | None, parent: str | None,
            votes_jsonl: str | None, reporter: _Reporter, registry: Any,
            guard: Any = None) -> dict[str, Any]:
    """The PPO phase, in this process or data-parallel (as `_reward_model`)."""
    if settings.learner_processes > 1:
        from learner.launch import run_launched

        return run_launched(settings, "policy", task_id, votes_jsonl=votes_jsonl,
                            rm_version=rm_version, parent=parent, **_launch_context(reporter))
    from learner.pipeline import run_policy

    return run_policy(settings, task_id, rm_version, parent, votes_jsonl, reporter, registry,
                      guard=guard)


def _launch_context(reporter: _Reporter) -> dict[str, Any]:
    """What the launched rank 0 needs to report to this task and to check its lock."""
    return {"celery_task_id": reporter.task.request.id, "lock_token": reporter.token,
            "fence": reporter.fence}


def _prepare(settings: Settings) -> Any:
    from learner.pipeline import bound_resources, registry_for

    bound_resources(settings)
    registry = registry_for(settings)
    registry.ensure_base()
    return registry


@shared_task(name="learner.ping")
def ping() -> str:
    return "pong"


@shared_task(bind=True, name="learner.tasks.train_reward_model")
def train_reward_model(self: Any, votes_jsonl: str | None = None) -> dict[str, Any]:
    settings = _settings()
    registry = _prepare(settings)
    return _reward_model(settings, self.request.id or "eager-rm", votes_jsonl,
                         _Reporter(self), registry)


@shared_task(bind=True, name="learner.tasks.train_policy")
def train_policy(self: Any, rm_version: str | None = None, parent: str | None = None,
                 votes_jsonl: str | None = None) -> dict[str, Any]:
    settings = _settings()
    registry = _prepare(settings)
    return _policy(settings, self.request.id or "eager-policy", rm_version, parent,
                   votes_jsonl, _Reporter(self), registry)


@shared_task(bind=True, name="learner.tasks.iterate")
def iterate(self: Any, votes_jsonl: str | None = None, lock_token: str | None = None,
            reason: str = "on demand") -> dict[str, Any]:
    """One iteration of online RLHF: a reward model on all votes so far, then PPO from the
    current policy against it; the new policy is registered as a candidate."""
    from learner import artifacts
    from learner.pipeline import NotEnoughVotes
    from learner.trigger import TASK_PHASES, IterationLock, LockLost, was_cancelled

    settings = _settings()
    task_id = self.request.id or "eager-iterate"
    token = lock_token or task_id
    lock = IterationLock.for_settings(settings)
    if was_cancelled(lock.redis, token):
        log.info("learner iteration %s was cancelled before it ran; skipped", task_id)
        return {"status": "cancelled", "reason": "cancelled by an operator"}
    # A duplicate delivery (a second worker, or past the visibility timeout) finds the lock
    # held, by another task or by a live delivery of this one, and does nothing; a
    # re-delivery after a worker died takes over once the dead one's lease lapses.
    fence = lock.claim_waiting(token, wait_s=lock.lease_s + 1)
    if fence is None:
        holder = lock.holder()
        message = (f"another delivery of this iteration (task {token}) is running; skipped"
                   if holder == token else
                   f"another learner iteration holds the lock (task {holder}); skipped")
        log.info(message)
        return {"status": "skipped", "reason": message}
    try:
        registry = _prepare(settings)
        log.info("learner iteration %s started (%s, fencing token %s)", task_id, reason, fence)
        reporter = _Reporter(self, lock, token, fence)
        try:
            rm = _reward_model(settings, f"{task_id}-rm", votes_jsonl, reporter, registry,
                               guard=reporter.guard)
        except NotEnoughVotes as error:
            log.info("learner iteration %s skipped: %s", task_id, error)
            return {"status": "skipped", "reason": str(error)}
        policy = _policy(settings, f"{task_id}-policy", rm["version"], None, votes_jsonl,
                         reporter, registry, guard=reporter.guard)
        if policy.get("refused"):
            log.warning("learner iteration %s: its policy was refused, not registered: %s",
                        task_id, policy["refused"]["reason"])
            return {"status": "refused", "reward_model": rm, "policy": policy,
                    "reason": policy["refused"]["reason"]}
        log.info("learner iteration %s done: %s (from %s) with %s", task_id, policy["version"],
                 policy["parent"], rm["version"])
        return {"status": "done", "reward_model": rm, "policy": policy}
    except LockLost as error:
        # The work folders may be the new holder's now: leave them, and publish nothing.
        log.warning("learner iteration %s stopped: %s; nothing published", task_id, error)
        return {"status": "cancelled", "reason": str(error)}
    except IterationCancelled as error:
        for phase in TASK_PHASES:
            shutil.rmtree(settings.versions_dir / artifacts.WORK_DIR / f"{task_id}-{phase}",
                          ignore_errors=True)
        log.info("learner iteration %s stopped: %s", task_id, error)
        return {"status": "cancelled", "reason": str(error)}
    finally:
        lock.release_held(token, fence)
