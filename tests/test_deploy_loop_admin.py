"""The operator's controls of the loop on the real gateway (uvicorn in a thread; no model
server is needed for these routes) and the real Redis, and a real Celery worker for cancel:
GET /admin/learner, start/pause/resume/cancel, auto-promote pause/resume, their token, the
CLI, and the recent errors the operator console lists."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from typer.testing import CliRunner

from arena.cli import app as cli_app
from core.settings import Settings
from deploy.decision import auto_promote_paused
from deploy.registry import Registry
from learner import artifacts
from learner.prompt_pool import load_shipped_prompts
from learner.trigger import IterationLock, is_paused, start_iteration, why_not_start
from learner.vote_source import write_jsonl
from serve.app import create_app
from testkit.hidden_rule_votes import hidden_rule_votes
from testkit.net import free_port

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Arena-Actor": "pytest"}
PROGRESS_TIMEOUT_S = 180
LEARNER_ENV = {"ARENA_LEARNER_PPO_STEPS": "500", "ARENA_LEARNER_ROLLOUT": "transformers",
               "ARENA_LEARNER_THREADS": "1", "ARENA_LEARNER_USER_PROMPTS": "0",
               "ARENA_LEARNER_NICE": "0"}


@pytest.fixture
def gateway(settings: Settings) -> Iterator[httpx.Client]:
    """The gateway app on a free port, pointed at a model server that is not there."""
    app_settings = settings.model_copy(update={"vllm_urls": [f"http://127.0.0.1:{free_port()}"]})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(app_settings), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)


def audit(settings: Settings) -> list[dict]:
    return [json.loads(line)
            for line in (settings.data_dir / "audit.log").read_text().splitlines()]


def test_learner_controls_need_the_token_then_pause_and_resume(
        gateway: httpx.Client, settings: Settings) -> None:
    client = redis.Redis.from_url(settings.effective_redis_url)
    calls = [("GET", "/admin/learner"), ("POST", "/admin/learner/pause"),
             ("POST", "/admin/learner/cancel"), ("POST", "/admin/auto-promote/pause")]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = gateway.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_admin_token"
    assert not is_paused(client) and not auto_promote_paused(client)
    # The console's list of recent error answers has them, newest first, behind the token.
    assert gateway.get("/admin/errors").status_code == 401
    recent = gateway.get("/admin/errors", params={"limit": 3}, headers=AUTH).json()["data"]
    assert [(e["method"], e["path"], e["status"], e["code"]) for e in recent] == [
        ("GET", "/admin/errors", 401, "invalid_admin_token"),
        ("POST", "/admin/auto-promote/pause", 401, "invalid_admin_token"),
        ("POST", "/admin/auto-promote/pause", 401, "invalid_admin_token")]
    assert "token" in recent[0]["message"]

    status = gateway.get("/admin/learner", headers=AUTH).json()
    assert status["running"] is None and status["paused"] is False
    assert status["auto_promote"] is True and status["auto_promote_paused"] is False
    assert status["votes_waiting"] == 0 and status["pending"] == [] and status["blocked"] is None

    paused = gateway.post("/admin/learner/pause", headers=AUTH)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert "paused" in paused.json()["blocked"]
    refused = start_iteration(settings)  # the trigger's call: no iteration while paused
    assert not refused["started"] and "paused" in refused["message"]
    by_hand = gateway.post("/admin/learner/start", headers=AUTH)  # the operator's: neither
    assert by_hand.status_code == 409 and "paused" in by_hand.json()["error"]["message"]
    assert IterationLock(client, 0).holder() is None
    assert gateway.post("/admin/learner/resume", headers=AUTH).json()["paused"] is False
    assert why_not_start(client) is None

    assert gateway.post("/admin/auto-promote/pause", headers=AUTH).json()[
        "auto_promote_paused"] is True
    assert auto_promote_paused(client)
    assert gateway.post("/admin/auto-promote/resume", headers=AUTH).json()[
        "auto_promote_paused"] is False

    nothing = gateway.post("/admin/learner/cancel", headers=AUTH)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "not_running"
    assert gateway.post("/admin/learner/sleep", headers=AUTH).status_code == 422
    actions = [(line["action"], line["actor"]) for line in audit(settings)]
    assert actions[-4:] == [("learner-pause", "pytest"), ("learner-resume", "pytest"),
                            ("auto-promote-pause", "pytest"), ("auto-promote-resume", "pytest")]

    # The same through the CLI.
    env = {"ARENA_ADMIN_URL": str(gateway.base_url), "ARENA_ADMIN_TOKEN": TOKEN,
           "ARENA_DATA_DIR": str(settings.data_dir), "COLUMNS": "200"}
    runner = CliRunner()
    out = runner.invoke(cli_app, ["learner", "pause"], env=env)
    assert out.exit_code == 0 and "paused" in out.output and is_paused(client), out.output
    out = runner.invoke(cli_app, ["learner", "resume"], env=env)
    assert out.exit_code == 0 and not is_paused(client), out.output
    out = runner.invoke(cli_app, ["auto-promote", "pause"], env=env)
    assert out.exit_code == 0 and auto_promote_paused(client), out.output
    out = runner.invoke(cli_app, ["learner", "status"], env=env)
    assert out.exit_code == 0 and "votes waiting" in out.output, out.output
    out = runner.invoke(cli_app, ["learner", "cancel"], env=env)
    assert out.exit_code == 1 and "409" in out.output, out.output
    out = runner.invoke(cli_app, ["learner", "pause"], env={**env, "ARENA_ADMIN_TOKEN": "x"})
    assert out.exit_code == 1 and "401" in out.output, out.output


@pytest.fixture
def learner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment of the worker the `celery_worker` fixture starts (it copies os.environ):
    an iteration long enough to be cancelled mid-PPO."""
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)


def test_cancel_stops_the_running_iteration(learner_env: None, gateway: httpx.Client,
                                            settings: Settings, celery_worker,
                                            tmp_path: Path) -> None:
    client = redis.Redis.from_url(settings.effective_redis_url)
    votes = write_jsonl(tmp_path / "votes.jsonl",
                        hidden_rule_votes(100, load_shipped_prompts(), seed=7))
    started = start_iteration(settings, votes_jsonl=votes)
    assert started["started"], started
    task = started["task_id"]

    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while True:
        status = gateway.get("/admin/learner", headers=AUTH).json()
        if status["phase"] == "policy" and status["step"]:
            break
        assert time.monotonic() < deadline, (status, (settings.data_dir / "worker.log")
                                             .read_text()[-3000:])
        time.sleep(0.3)
    assert status["running"] == status["task_id"] == task and status["state"] == "PROGRESS"
    assert status["total"] == 500 and "kl" in status["metrics"]
    assert "already running" in status["blocked"]
    work = settings.versions_dir / artifacts.WORK_DIR / f"{task}-policy"
    assert work.is_dir()

    cancelled = gateway.post("/admin/learner/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["cancel"]["cancelled"] == task and body["cancel"]["state"] == "REVOKED"
    assert body["running"] is None and body["state"] == "REVOKED"
    assert IterationLock(client, 0).holder() is None and why_not_start(client) is None
    assert not work.exists()
    assert not [r for r in Registry(client).all() if r.kind == "policy"]
    time.sleep(2)  # the killed task does not come back (its id is remembered as cancelled)
    assert IterationLock(client, 0).holder() is None
    assert [line["action"] for line in audit(settings)][-1] == "cancel"
    log = (settings.data_dir / "worker.log").read_text()
    assert f"learner progress (task {task}): phase policy step" in log, log[-3000:]
