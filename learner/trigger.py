"""Starting, following, pausing and cancelling a learner iteration from outside the worker:
the feedback learner-trigger consumer (every `learn_every_votes` new votes), `arena learn`,
the admin API (`/admin/learner`, `arena learner ...`).

Only one iteration runs at a time: a Redis lock `arena:learner:lock` (SET NX with expiry)
holds the id of the iterate task that owns it. A second trigger while it is held is a no-op
that says so and names the running task. The task renews the expiry while it trains and
deletes the lock when it ends; a worker killed mid-run leaves the lock to expire
(`learner_lock_ttl_s`) unless the re-delivered task, carrying the same id, takes it up again.

The loop's gates (`why_not_start`): no iteration starts while one runs, while learning is
paused (`arena:learner:paused`), or while a candidate the learner made waits for the loop's
decision (deploy/decision.py): the next iteration starts from the decided `current`.
A cancelled task id is remembered (`arena:learner:cancelled`) so a re-delivery never runs it.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from arena.settings import Settings

LOCK_KEY = "arena:learner:lock"
PAUSED_KEY = "arena:learner:paused"
LAST_TASK_KEY = "arena:learner:last_task"  # id of the last iteration started
CANCELLED_KEY = "arena:learner:cancelled"  # set of cancelled iteration task ids
ITERATE_TASK = "learner.tasks.iterate"
FOLLOW_POLL_S = 0.5
CANCEL_WAIT_S = 15.0  # how long a cancel waits for the worker to stop the task
TASK_PHASES = ("rm", "policy")  # an iterate task's work dirs: .work/<task id>-<phase>

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


# --- the gates --------------------------------------------------------------------------------
def running_task(client: redis.Redis) -> str | None:
    """The id of the iteration that holds the lock, if one runs."""
    value = client.get(LOCK_KEY)
    return value.decode() if isinstance(value, bytes) else value


def is_paused(client: redis.Redis) -> bool:
    return bool(client.exists(PAUSED_KEY))


def set_paused(client: redis.Redis, paused: bool) -> None:
    """Pause: no new iteration starts (votes keep counting; a running one finishes)."""
    if paused:
        client.set(PAUSED_KEY, json.dumps({"ts": time.time()}))
    else:
        client.delete(PAUSED_KEY)


def why_not_start(client: redis.Redis) -> str | None:
    """Why no iteration may start now (None: it may): one runs, learning is paused, or a
    candidate the learner made waits for the loop's decision."""
    from deploy.decision import pending
    from deploy.registry import Registry

    if (running := running_task(client)) is not None:
        return f"a learner iteration is already running (task {running})"
    if is_paused(client):
        return "learning is paused (arena learner resume)"
    if waiting := pending(client, Registry(client)):
        return (f"candidate {', '.join(waiting)} is waiting for the loop's decision; the next "
                "iteration starts from the decided current version")
    return None


def start_iteration(settings: Settings, votes_jsonl: str | Path | None = None,
                    reason: str = "on demand", force: bool = False) -> dict[str, Any]:
    """Queue `learner.tasks.iterate` unless one is running, or (unless `force`) learning is
    paused or a learner candidate waits for a decision. Returns
    {"started": bool, "task_id": str | None, "message": str}."""
    from learner.celery_app import make_celery

    client = redis.Redis.from_url(settings.effective_redis_url)
    lock = IterationLock(client, settings.learner_lock_ttl_s)
    task_id = str(uuid.uuid4())
    try:
        blocked = None if force else why_not_start(client)
        if blocked is not None or not lock.acquire(task_id):
            running = lock.holder()
            message = blocked or f"a learner iteration is already running (task {running})"
            return {"started": False, "task_id": running,
                    "message": f"{message}; this trigger does nothing"}
        try:
            make_celery(settings).send_task(
                ITERATE_TASK, task_id=task_id,
                kwargs={"votes_jsonl": str(votes_jsonl) if votes_jsonl else None,
                        "lock_token": task_id, "reason": reason})
        except Exception:
            lock.release(task_id)
            raise
        client.set(LAST_TASK_KEY, task_id)
    finally:
        client.close()
    return {"started": True, "task_id": task_id,
            "message": f"learner iteration queued (task {task_id}, {reason})"}


def was_cancelled(client: redis.Redis, task_id: str) -> bool:
    return bool(client.sismember(CANCELLED_KEY, task_id))


def cancel_iteration(settings: Settings, wait_s: float = CANCEL_WAIT_S) -> dict[str, Any]:
    """Stop the running iteration: revoke its task (the worker kills the process running it),
    wait for the worker to say so, release the lock, remove the task's work dirs.
    {"cancelled": task id or None, "state": Celery state, "removed": [dirs], "message"}."""
    from learner import artifacts
    from learner.celery_app import make_celery

    client = redis.Redis.from_url(settings.effective_redis_url)
    try:
        lock = IterationLock(client, settings.learner_lock_ttl_s)
        task_id = lock.holder()
        if task_id is None:
            return {"cancelled": None, "state": None, "removed": [],
                    "message": "no learner iteration is running"}
        client.sadd(CANCELLED_KEY, task_id)
        app = make_celery(settings)
        app.control.revoke(task_id, terminate=True, signal="SIGTERM")
        state = app.AsyncResult(task_id).state
        deadline = time.monotonic() + wait_s
        # A queued task (PENDING) has no process to stop: the worker drops it as revoked, and
        # the task itself checks the cancelled set should it ever run.
        while state in ("STARTED", "PROGRESS") and time.monotonic() < deadline:
            time.sleep(0.2)
            state = app.AsyncResult(task_id).state
        lock.release(task_id)
        removed = []
        for phase in TASK_PHASES:
            work = settings.versions_dir / artifacts.WORK_DIR / f"{task_id}-{phase}"
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
                removed.append(str(work))
    finally:
        client.close()
    return {"cancelled": task_id, "state": state, "removed": removed,
            "message": f"learner iteration {task_id} cancelled ({state.lower()})"}


def task_status(settings: Settings, task_id: str) -> dict[str, Any]:
    """Celery state and progress meta of a learner task (as the admin API would show it)."""
    from learner.celery_app import make_celery

    result = make_celery(settings).AsyncResult(task_id)
    info = result.info
    if isinstance(info, BaseException):
        info = {"error": repr(info)}
    return {"task_id": task_id, "state": result.state, "info": info or {}}


def learner_status(settings: Settings) -> dict[str, Any]:
    """What the loop is doing (GET /admin/learner): the running (or last) iteration's task
    state and progress, the gates, votes waiting, pending candidates and decisions."""
    from deploy.decision import auto_promote_paused, load_decisions, pending
    from deploy.registry import Registry
    from feedback.vote_stream import LEARNER_VOTES_KEY

    client = redis.Redis.from_url(settings.effective_redis_url)
    try:
        running = running_task(client)
        last = client.get(LAST_TASK_KEY)
        task_id = running or (last.decode() if isinstance(last, bytes) else last)
        task = task_status(settings, task_id) if task_id else None
        meta = task["info"] if task is not None and isinstance(task["info"], dict) else {}
        progress = meta if running else {}
        return {
            "running": running,
            "task_id": task_id,
            "state": task["state"] if task is not None else None,
            "phase": progress.get("phase"), "step": progress.get("step"),
            "total": progress.get("total"),
            "metrics": {k: v for k, v in progress.items()
                        if isinstance(v, int | float) and k not in ("step", "total")},
            "last_result": None if running else (meta or None),
            "paused": is_paused(client),
            "auto_promote": settings.auto_promote,
            "auto_promote_paused": auto_promote_paused(client),
            "votes_waiting": int(client.get(LEARNER_VOTES_KEY) or 0),
            "learn_every_votes": settings.learn_every_votes,
            "pending": pending(client, Registry(client)),
            "blocked": why_not_start(client),
            "decisions": load_decisions(client),
        }
    finally:
        client.close()


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
