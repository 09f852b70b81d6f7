"""`learner.tasks.iterate` end to end through a real Celery worker on the tiny preset: the
trigger, the one-iteration lock (a second trigger is a no-op that says so), progress in the
task state, `arena learn`, and the resulting candidate versions in the registry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arena.settings import Settings
from learner import artifacts
from learner.pipeline import registry_for
from learner.prompt_pool import load_shipped_prompts
from learner.synthetic import hidden_rule_votes
from learner.trigger import IterationLock, follow_iteration, start_iteration, task_status
from learner.votes import write_jsonl

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
    assert policy.metrics["sanity"]["parent"]["answers"] == 16  # the sanity gate's figures
    assert artifacts.verify(Path(policy.path))
    assert registry.get("rm-v1").kind == "reward"
    assert IterationLock.for_settings(settings).holder() is None  # released

    # `--follow` on a finished task returns at once with its result.
    final = follow_iteration(settings, first["task_id"], console=None, timeout_s=10)
    assert final["state"] == "SUCCESS"
