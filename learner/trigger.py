"""Starting and following a learner iteration from outside the worker: the feedback
learner-trigger consumer (every `learn_every_votes` new votes), `arena learn`, the admin API.

Only one iteration runs at a time: a Redis lock `arena:learner:lock` (SET NX with expiry)
holds the id of the iterate task that owns it. A second trigger while it is held is a no-op
that says so and names the running task. The task renews the expiry while it trains and
deletes the lock when it ends; a worker killed mid-run leaves the lock to expire
(`learner_lock_ttl_s`) unless the re-delivered task, carrying the same id, takes it up again.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis

from arena.settings import Settings

LOCK_KEY = "arena:learner:lock"
ITERATE_TASK = "learner.tasks.iterate"
FOLLOW_POLL_S = 0.5

# Compare-and-act on the lock: only its owner may renew or delete it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
         "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
           "return redis.call('del', KEYS[1]) else return 0 end"


class IterationLock:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = client, ttl_s

    @classmethod
    def for_settings(cls, settings: Settings) -> IterationLock:
        return cls(redis.Redis.from_url(settings.effective_redis_url), settings.learner_lock_ttl_s)

    def acquire(self, token: str) -> bool:
        return bool(self.redis.set(LOCK_KEY, token, nx=True, ex=self.ttl_s))

    def holder(self) -> str | None:
        value = self.redis.get(LOCK_KEY)
        return value.decode() if isinstance(value, bytes) else value

    def hold(self, token: str) -> bool:
        """Own the lock: already ours (a re-delivered task), or free and now taken."""
        return self.renew(token) or self.acquire(token)

    def renew(self, token: str) -> bool:
        return bool(self.redis.eval(_RENEW, 1, LOCK_KEY, token, self.ttl_s))

    def release(self, token: str) -> bool:
        return bool(self.redis.eval(_RELEASE, 1, LOCK_KEY, token))


def start_iteration(settings: Settings, votes_jsonl: str | Path | None = None,
                    reason: str = "on demand") -> dict[str, Any]:
    """Queue `learner.tasks.iterate` unless one is running. Returns
    {"started": bool, "task_id": str | None, "message": str}."""
    from learner.celery_app import make_celery

    lock = IterationLock.for_settings(settings)
    task_id = str(uuid.uuid4())
    if not lock.acquire(task_id):
        running = lock.holder()
        return {"started": False, "task_id": running,
                "message": f"a learner iteration is already running (task {running}); "
                           "this trigger does nothing"}
    try:
        make_celery(settings).send_task(
            ITERATE_TASK, task_id=task_id,
            kwargs={"votes_jsonl": str(votes_jsonl) if votes_jsonl else None,
                    "lock_token": task_id, "reason": reason})
    except Exception:
        lock.release(task_id)
        raise
    return {"started": True, "task_id": task_id,
            "message": f"learner iteration queued (task {task_id}, {reason})"}


def task_status(settings: Settings, task_id: str) -> dict[str, Any]:
    """Celery state and progress meta of a learner task (as the admin API would show it)."""
    from learner.celery_app import make_celery

    result = make_celery(settings).AsyncResult(task_id)
    info = result.info
    if isinstance(info, BaseException):
        info = {"error": repr(info)}
    return {"task_id": task_id, "state": result.state, "info": info or {}}


def follow_iteration(settings: Settings, task_id: str, console: Any = None,
                     timeout_s: float | None = None) -> dict[str, Any]:
    """Show a rich progress bar from the task's PROGRESS state until it ends; returns the
    final status."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        phases: dict[str, Any] = {}
        while True:
            status = task_status(settings, task_id)
            meta = status["info"] if isinstance(status["info"], dict) else {}
            if status["state"] == "PROGRESS" and "phase" in meta:
                phase = meta["phase"]
                if phase not in phases:
                    phases[phase] = bar.add_task(phase, total=meta.get("total") or 1, stats="")
                stats = "  ".join(f"{k} {meta[k]:.3g}" for k in ("reward", "kl", "loss", "eta_s")
                                  if isinstance(meta.get(k), int | float))
                bar.update(phases[phase], completed=meta.get("step", 0),
                           total=meta.get("total") or 1, stats=stats)
            if status["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                for task in phases.values():
                    if status["state"] == "SUCCESS":
                        bar.update(task, completed=bar.tasks[task].total)
                return status
            if deadline is not None and time.monotonic() > deadline:
                return status
            time.sleep(FOLLOW_POLL_S)
