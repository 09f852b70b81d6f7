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
Each start first removes the checkpoint folders (`<versions>/.work`) of tasks that ended
(`remove_finished_work`; `arena gc` does it too).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from core.settings import Settings
from core.text import as_str

LOCK_KEY = "arena:learner:lock"
PAUSED_KEY = "arena:learner:paused"
LAST_TASK_KEY = "arena:learner:last_task"  # id of the last iteration started
CANCELLED_KEY = "arena:learner:cancelled"  # set of cancelled iteration task ids
# The vote counting of learner/vote_trigger.py:
VOTES_WAITING_KEY = "arena:learner:votes_since_run"  # votes counted since the last run
COUNTED_KEY = "arena:learner:counted"  # zset: vote ids counted, scored by when
LAST_TRIGGER_KEY = "arena:learner:last_trigger"  # {"ts", "votes"} of the last start
ITERATE_TASK = "learner.tasks.iterate"
FOLLOW_POLL_S = 0.5
CANCEL_WAIT_S = 15.0  # how long a cancel waits for the worker to stop the task
TASK_PHASES = ("rm", "policy")  # an iterate task's work dirs: .work/<task id>-<phase>
# Fencing: which delivery of the lock's task trains (`claim`), by a token from a counter.
OWNER_KEY = "arena:learner:lock:owner:{task}"  # string: the fencing token of the delivery
FENCE_KEY = "arena:learner:lock:fence"  # counter of fencing tokens
CLAIM_POLL_S = 1.0

# Compare-and-act on the lock: only its owner may renew or delete it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
         "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
           "return redis.call('del', KEYS[1]) else return 0 end"
# KEYS: lock, owner, fence counter; ARGV: task, lock ttl, lease. The lock is the task's (or
# free) and no other delivery of the task holds a live lease: a new fencing token.
_CLAIM = """
local holder = redis.call('get', KEYS[1])
if (holder and holder ~= ARGV[1]) or redis.call('exists', KEYS[2]) == 1 then return false end
local fence = redis.call('incr', KEYS[3])
redis.call('set', KEYS[1], ARGV[1], 'ex', ARGV[2])
redis.call('set', KEYS[2], fence, 'ex', ARGV[3])
return fence
"""
# KEYS: lock, owner; ARGV: task, fence, lock ttl, lease. Still the holder: renew both.
_CHECK = """
if redis.call('get', KEYS[1]) ~= ARGV[1] or redis.call('get', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('expire', KEYS[1], ARGV[3])
redis.call('expire', KEYS[2], ARGV[4])
return 1
"""
# KEYS: lock, owner; ARGV: task, fence. Only the holder releases (a fenced-off one never).
_RELEASE_HELD = """
if redis.call('get', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('del', KEYS[2])
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 1
"""


class LockLost(Exception):
    """This delivery of the iteration no longer holds the lock (it expired, or another
    delivery of the task took it over): it must stop and never publish."""


class IterationLock:
    """The lock (value: the task id) says which iteration runs; the fencing token says which
    delivery of that task trains. `claim` takes a token, `check` (before each checkpoint
    write and publish, and on every progress report) renews the lock and the token's lease
    or says it was lost. A delivery whose holder stopped renewing for `lease_s` (a killed
    worker) can be taken over by a re-delivery; the old holder then fails its next check."""

    def __init__(self, client: redis.Redis, ttl_s: int, lease_s: int | None = None) -> None:
        self.redis, self.ttl_s = client, ttl_s
        self.lease_s = ttl_s if lease_s is None else lease_s

    @classmethod
    def for_settings(cls, settings: Settings) -> IterationLock:
        return cls(redis.Redis.from_url(settings.effective_redis_url), settings.learner_lock_ttl_s,
                   settings.learner_lease_s)

    def acquire(self, token: str) -> bool:
        return bool(self.redis.set(LOCK_KEY, token, nx=True, ex=self.ttl_s))

    def holder(self) -> str | None:
        return as_str(self.redis.get(LOCK_KEY))

    def hold(self, token: str) -> bool:
        """Own the lock: already ours (a re-delivered task), or free and now taken."""
        return self.renew(token) or self.acquire(token)

    def renew(self, token: str) -> bool:
        return bool(self.redis.eval(_RENEW, 1, LOCK_KEY, token, self.ttl_s))

    def release(self, token: str) -> bool:
        """Free the lock of task `token` from outside (a cancel, a failed queueing)."""
        self.redis.delete(OWNER_KEY.format(task=token))
        return bool(self.redis.eval(_RELEASE, 1, LOCK_KEY, token))

    def claim(self, token: str) -> str | None:
        """A fencing token for this delivery of task `token`, or None: the lock is another
        task's, or another delivery of this task holds a live lease."""
        fence = self.redis.eval(_CLAIM, 3, LOCK_KEY, OWNER_KEY.format(task=token), FENCE_KEY,
                                token, self.ttl_s, self.lease_s)
        return None if fence is None else str(fence)

    def claim_waiting(self, token: str, wait_s: float) -> str | None:
        """`claim`, retried for up to `wait_s` while another delivery of the same task holds
        the lease: a holder that was killed stops renewing it, a live one never does."""
        deadline = time.monotonic() + wait_s
        while (fence := self.claim(token)) is None:
            if self.holder() not in (token, None) or time.monotonic() >= deadline:
                return None
            time.sleep(CLAIM_POLL_S)
        return fence

    def check(self, token: str, fence: str) -> bool:
        """Still the holder (then the lock and the lease are renewed)?"""
        return bool(self.redis.eval(_CHECK, 2, LOCK_KEY, OWNER_KEY.format(task=token), token,
                                    fence, self.ttl_s, self.lease_s))

    def release_held(self, token: str, fence: str) -> bool:
        """Release the lock if this delivery still holds it; a fenced-off one leaves it."""
        return bool(self.redis.eval(_RELEASE_HELD, 2, LOCK_KEY, OWNER_KEY.format(task=token),
                                    token, fence))


# --- the gates --------------------------------------------------------------------------------
def running_task(client: redis.Redis) -> str | None:
    """The id of the iteration that holds the lock, if one runs."""
    return as_str(client.get(LOCK_KEY))


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
        app = make_celery(settings)
        try:
            remove_finished_work(settings, client, app)
            app.send_task(
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


def remove_finished_work(settings: Settings, client: redis.Redis, app: Any = None) -> list[Path]:
    """Remove the `.work` checkpoint folders of learner tasks that ended. A run removes its
    own when it publishes; this catches the rest (failed, skipped, cancelled, a worker gone
    for good). A folder is kept while its task holds the iteration lock, or Celery has not
    seen it end and it was written to within `learner_lock_ttl_s` (a live run renews the
    lock and checkpoints more often than that)."""
    from celery import states

    from learner import artifacts
    from learner.celery_app import make_celery

    backend = (app or make_celery(settings)).backend
    running = running_task(client)

    def finished(task_id: str, idle_s: float) -> bool:
        if task_id == running:
            return False
        return (idle_s > settings.learner_lock_ttl_s
                or backend.get_task_meta(task_id)["status"] in states.READY_STATES)

    return artifacts.remove_finished_work(settings.versions_dir, finished, TASK_PHASES)


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

    # One read of the backend: `AsyncResult.state` and `.info` would each read it again, and
    # a task finishing between the two reads would pair SUCCESS with its progress meta.
    meta = make_celery(settings).backend.get_task_meta(task_id)
    info = meta.get("result")
    if isinstance(info, BaseException):
        info = {"error": repr(info)}
    return {"task_id": task_id, "state": meta["status"], "info": info or {}}


def learner_status(settings: Settings) -> dict[str, Any]:
    """What the loop is doing (GET /admin/learner): the running (or last) iteration's task
    state and progress, the gates, votes waiting, pending candidates and decisions."""
    from deploy.decision import auto_promote_paused, load_decisions, pending
    from deploy.registry import Registry

    client = redis.Redis.from_url(settings.effective_redis_url)
    try:
        running = running_task(client)
        last = client.get(LAST_TASK_KEY)
        task_id = running or as_str(last)
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
            "votes_waiting": int(client.get(VOTES_WAITING_KEY) or 0),
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
