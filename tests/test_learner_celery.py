"""`learner.tasks.iterate` end to end through a real Celery worker on the tiny preset: the
trigger, the one-iteration lock (a second trigger is a no-op that says so), progress in the
task state, `arena learn`, and the resulting candidate versions in the registry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import Settings
from learner import artifacts
from learner.pipeline import registry_for
from learner.prompt_pool import load_shipped_prompts
from learner.sanity import SANITY_PROMPTS
from learner.trigger import IterationLock, follow_iteration, start_iteration, task_status
from learner.vote_source import write_jsonl
from testkit.hidden_rule_votes import hidden_rule_votes

ITERATION_TIMEOUT_S = 240
LEARNER_ENV = {"ARENA_LEARNER_PPO_STEPS": "3", "ARENA_LEARNER_ROLLOUT": "transformers",
               "ARENA_LEARNER_THREADS": "1", "ARENA_LEARNER_USER_PROMPTS": "0"}


@pytest.fixture
def learner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment of the worker the `celery_worker` fixture starts (it copies os.environ)."""
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)


def test_iterate_through_celery_worker(learner_env: None, settings: Settings, celery_worker,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    votes = write_jsonl(tmp_path / "votes.jsonl",
                        hidden_rule_votes(100, load_shipped_prompts(), seed=5))
    first = start_iteration(settings, votes_jsonl=votes)
    assert first["started"], first

    # A second trigger while it runs does nothing and says so, naming the running task.
    second = start_iteration(settings, votes_jsonl=votes)
    assert not second["started"]
    assert second["task_id"] == first["task_id"]
    assert "already running" in second["message"]
    # … and so does `arena learn` (same settings through the environment).
    for key, value in {"ARENA_DATA_DIR": str(settings.data_dir),
                       "ARENA_REDIS_URL": settings.effective_redis_url,
                       "ARENA_BASE_MODEL": str(settings.base_model_path)}.items():
        monkeypatch.setenv(key, value)
    from arena.cli import app

    cli = CliRunner().invoke(app, ["learn"])
    assert cli.exit_code == 0, cli.output
    assert "already running" in cli.output

    # Progress shows up in the task state while it trains.
    states, phases = set(), set()
    deadline = time.monotonic() + ITERATION_TIMEOUT_S
    while time.monotonic() < deadline:
        status = task_status(settings, first["task_id"])
        states.add(status["state"])
        if status["state"] == "PROGRESS":
            phases.add(status["info"].get("phase"))
            assert {"step", "total", "eta_s"} <= set(status["info"])
        if status["state"] in ("SUCCESS", "FAILURE"):
            break
        time.sleep(0.2)
    log = (settings.data_dir / "worker.log").read_text()
    assert status["state"] == "SUCCESS", (status, log[-4000:])
    assert "PROGRESS" in states and "policy" in phases, (states, phases)

    info = status["info"]
    assert info["status"] == "done"
    assert info["reward_model"]["version"] == "rm-v1"
    assert info["policy"]["version"] == "policy-v1"
    assert info["policy"]["parent"] == "base" and info["policy"]["rm_version"] == "rm-v1"
    assert "ppo step 3/3" in log
    assert f"learner progress (task {first['task_id']}): phase policy step 3/3" in log

    registry = registry_for(settings)
    policy = registry.get("policy-v1")
    assert (policy.kind, policy.state, policy.created_by) == ("policy", "candidate", "learner")
    assert policy.metrics["sanity"]["parent"]["answers"] == SANITY_PROMPTS  # the gate's figures
    assert artifacts.verify(Path(policy.path))
    assert registry.get("rm-v1").kind == "reward"
    assert IterationLock.for_settings(settings).holder() is None  # released

    # `--follow` on a finished task returns at once with its result.
    final = follow_iteration(settings, first["task_id"], console=None, timeout_s=10)
    assert final["state"] == "SUCCESS"


# --- fencing: one delivery of an iteration trains, a fenced-off one never publishes ------------
def test_lock_fencing_tokens(settings: Settings) -> None:
    import redis

    from learner.trigger import OWNER_KEY

    client = redis.Redis.from_url(settings.effective_redis_url)
    lock = IterationLock(client, 60, lease_s=60)
    first = lock.claim("task-1")
    assert first is not None and lock.holder() == "task-1"
    assert lock.claim("task-1") is None  # a duplicate delivery: held by a live one
    assert lock.claim("task-2") is None  # another task
    assert lock.check("task-1", first)
    client.delete(OWNER_KEY.format(task="task-1"))  # its lease lapsed: a re-delivery takes over
    second = lock.claim("task-1")
    assert second is not None and int(second) > int(first)
    assert not lock.check("task-1", first)  # the old holder is fenced off ...
    assert not lock.release_held("task-1", first)  # ... and cannot free the new one's lock
    assert lock.holder() == "task-1" and lock.check("task-1", second)
    assert lock.release_held("task-1", second) and lock.holder() is None

    # A holder that stopped renewing (killed) is taken over once its lease lapses.
    short = IterationLock(client, 60, lease_s=1)
    dead = short.claim("task-3")
    started = time.monotonic()
    taken = short.claim_waiting("task-3", wait_s=5)
    assert taken is not None and taken != dead and time.monotonic() - started < 4
    assert not short.check("task-3", dead)
    short.release_held("task-3", taken)


def _eager_iterate(monkeypatch: pytest.MonkeyPatch, settings: Settings, votes: Path,
                   token: str) -> dict:
    from learner import tasks

    monkeypatch.setattr(tasks, "_settings", lambda: settings)
    return tasks.iterate.run(votes_jsonl=str(votes), lock_token=token)


def test_duplicate_delivery_sees_the_lock_held_and_does_nothing(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import learner.pipeline

    votes = write_jsonl(tmp_path / "votes.jsonl", hidden_rule_votes(40, load_shipped_prompts()))
    original = IterationLock.for_settings(settings)
    fence = original.claim("task-dup")  # the original delivery, still running
    assert fence is not None

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("the duplicate delivery trained")

    monkeypatch.setattr(learner.pipeline, "run_reward_model", must_not_train)
    duplicate = settings.model_copy(update={"learner_lease_s": 1})  # waits ~2 s, then gives up
    result = _eager_iterate(monkeypatch, duplicate, votes, "task-dup")
    assert result["status"] == "skipped" and "another delivery" in result["reason"]
    assert original.check("task-dup", fence)  # the original still holds it, untouched


def test_a_run_that_lost_its_lock_stops_without_publishing(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import learner.pipeline
    import learner.reward_model
    from learner.trigger import OWNER_KEY

    settings = settings.model_copy(update={"learner_rollout": "transformers",
                                           "learner_nice": 0})
    votes = write_jsonl(tmp_path / "votes.jsonl", hidden_rule_votes(60, load_shipped_prompts()))
    lock = IterationLock.for_settings(settings)
    real_train = learner.reward_model.train_reward_model
    stolen: list[str] = []

    def train_then_lose_the_lock(*args: object, **kwargs: object) -> object:
        result = real_train(*args, **kwargs)
        # Meanwhile a re-delivery of the same task took the lock over (the lease lapsed).
        lock.redis.delete(OWNER_KEY.format(task="task-lost"))
        stolen.append(lock.claim("task-lost"))
        return result

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fenced-off run went on to the policy")

    monkeypatch.setattr(learner.reward_model, "train_reward_model", train_then_lose_the_lock)
    monkeypatch.setattr(learner.pipeline, "run_policy", must_not_run)
    with caplog.at_level("WARNING", logger="learner.tasks"):
        result = _eager_iterate(monkeypatch, settings, votes, "task-lost")

    assert result["status"] == "cancelled" and "lost its lock" in result["reason"]
    assert "nothing published" in caplog.text
    assert stolen and stolen[0] is not None
    assert artifacts.list_versions(settings.versions_dir, "rm") == []  # nothing published
    assert not [r for r in registry_for(settings).all() if r.kind == "reward"]
    # The new holder keeps the lock: the fenced-off run did not release it.
    assert lock.holder() == "task-lost" and lock.check("task-lost", stolen[0])
    lock.release_held("task-lost", stolen[0])
