"""The stack's processes for tests and benchmarks, started with the launcher's own commands
(arena/launcher.py) and configured from one Settings object through the environment, as
`arena up` configures its children."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from arena.launcher import gateway_command, worker_command
from core.settings import Settings, settings_environ
from testkit.net import free_port_ranges

ROOT = Path(__file__).resolve().parent.parent


def loopback_settings(work: Path, model_dir: Path, tiny: bool, **overrides: Any) -> Settings:
    """A stack of our own on loopback, as the serving benchmarks run it: free ports for Redis
    (`redis_port`), one vLLM replica (`vllm_port`), the gateway and two merged replicas; a
    fresh operator token; rate limits and chat archiving off (they would measure themselves)."""
    redis_port, vllm_port, gateway_port, *merged_ports = free_port_ranges(1, 1, 1, 1, 1)
    values: dict[str, Any] = dict(
        data_dir=work / "var", base_model=model_dir, admin_token=secrets.token_urlsafe(16),
        redis_port=redis_port, vllm_port=vllm_port, gateway_port=gateway_port,
        merged_ports=merged_ports, rate_chat_per_session=0, rate_chat_per_ip=0,
        archive_chats=False, vllm_kvcache_gib=1 if tiny else 2,
        vllm_max_model_len=512 if tiny else 2048)
    return Settings(_env_file=None, **{**values, **overrides})


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus `settings` (core.settings.settings_environ): a child
    building `Settings()` gets the same values."""
    return {**os.environ, **settings_environ(settings), "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def start(settings: Settings, argv: list[str], log: Path) -> subprocess.Popen:
    """`argv` with `settings` in its environment, in its own process group, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, env=settings_env(settings), cwd=ROOT, stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def start_gateway(settings: Settings, log: Path, *extra_args: str) -> subprocess.Popen:
    """The gateway as `arena up` runs it (uvicorn) on settings.gateway_port; `extra_args` go
    to uvicorn (e.g. "--workers", "2")."""
    return start(settings, [*gateway_command(settings), *extra_args], log)


def start_worker(settings: Settings, log: Path, name: str) -> subprocess.Popen:
    """The learner's Celery worker as `arena up` runs it, named `name` (unique per test)."""
    return start(settings, worker_command(sys.executable, name), log)


def start_arena(settings: Settings, log: Path, *command: str) -> subprocess.Popen:
    """An `arena` command as its own process, e.g. ("merged-replica",) or ("consumers",)."""
    return start(settings, [sys.executable, "-m", "arena.cli", *command], log)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process started in its own group, and all it started (SIGKILL after `timeout`)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def arena_up_env(work: Path, model_dir: Path, gateways: int = 1, replicas: int = 1,
                 **extra: str) -> dict[str, str]:
    """`arena up`'s environment for a stack of our own on free ports (`gateways` and
    `replicas` consecutive ones), the tiny learner preset; `extra` ARENA_* values on top.
    Inherited ARENA_* variables are dropped: the stack is this one, whatever the shell set."""
    redis_port, vllm_port, gateway_port = free_port_ranges(1, replicas, gateways)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({
        "ARENA_DATA_DIR": str(work / "var"), "ARENA_BASE_MODEL": str(model_dir),
        "ARENA_REDIS_PORT": str(redis_port), "ARENA_VLLM_PORT": str(vllm_port),
        "ARENA_GATEWAY_PORT": str(gateway_port), "ARENA_GATEWAYS": str(gateways),
        "ARENA_VLLM_REPLICAS": str(replicas), "ARENA_VLLM_KVCACHE_GIB": "1",
        "ARENA_VLLM_MAX_MODEL_LEN": "512", "ARENA_LEARNER_PRESET": "tiny", "COLUMNS": "200",
        "PYTHONPATH": str(ROOT), **extra,
    })
    return env
