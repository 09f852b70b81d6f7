"""`arena up` as a user runs it: the whole stack starts, answers the official client, and
SIGTERM (what Ctrl-C does to the launcher) stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import free_port

UP_TIMEOUT_S = 300


def stack_env(tmp_path: Path, tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({
        "ARENA_DATA_DIR": str(tmp_path / "var"), "ARENA_BASE_MODEL": str(tiny_model_dir),
        "ARENA_REDIS_PORT": str(free_port()), "ARENA_VLLM_PORT": str(free_port()),
        "ARENA_GATEWAY_PORT": str(free_port()), "ARENA_VLLM_KVCACHE_GIB": "1",
        "ARENA_VLLM_MAX_MODEL_LEN": "512", "ARENA_LEARNER_PRESET": "tiny", "COLUMNS": "200",
        **extra,
    })
    return env


def processes_of(data_dir: Path) -> list[int]:
    """Every live process whose environment names this data dir (i.e. one we started)."""
    marker = f"ARENA_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes():
                status = (proc / "status").read_text()
                if "State:\tZ" not in status:
                    found.append(int(proc.name))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return found


class Launcher:
    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "arena.cli", "up"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen; output:\n{''.join(self.lines)[-4000:]}")
            time.sleep(0.2)


def test_up_serves_the_openai_client_and_stops_everything(tmp_path, tiny_model_dir):
    env = stack_env(tmp_path, tiny_model_dir)
    data_dir = tmp_path / "var"
    launcher = Launcher(env)
    try:
        launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
        url = f"http://127.0.0.1:{env['ARENA_GATEWAY_PORT']}"
        assert any(url in line for line in launcher.lines)
        assert any("admin token generated" in line for line in launcher.lines)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="current", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert reply.model == "base" and reply.choices[0].message.content
        assert len(processes_of(data_dir)) >= 5  # redis, vllm (+engine), gateway, worker, consumers
        for name in ("redis", "vllm", "gateway", "worker", "consumers"):
            assert (data_dir / "logs" / f"{name}.log").exists()
        assert (data_dir / "redis" / "appendonlydir").exists()  # AOF persistence on
    finally:
        started = time.monotonic()
        launcher.proc.send_signal(signal.SIGTERM)
        launcher.proc.wait(timeout=60)
        stop_s = time.monotonic() - started
    assert launcher.proc.returncode == 0
    assert stop_s < 20, f"stopping took {stop_s:.1f}s"
    time.sleep(1)
    assert processes_of(data_dir) == [], "orphans left behind"


def test_a_process_dying_at_start_fails_with_its_log_tail(tmp_path, tiny_model_dir):
    env = stack_env(tmp_path, tiny_model_dir,
                    ARENA_VLLM_EXTRA_ARGS='["--no-such-flag-for-vllm"]')
    launcher = Launcher(env)
    launcher.proc.wait(timeout=UP_TIMEOUT_S)
    output = "".join(launcher.lines)
    assert launcher.proc.returncode != 0
    assert "start-up failed" in output and "vllm exited" in output
    assert "no-such-flag-for-vllm" in output.split("last lines of vllm")[1]
    time.sleep(1)
    assert processes_of(tmp_path / "var") == []


@pytest.mark.parametrize("missing", ["redis-server"])
def test_missing_redis_server_says_how_to_install(tmp_path, tiny_model_dir, missing):
    env = stack_env(tmp_path, tiny_model_dir)
    env["PATH"] = str(Path(sys.executable).parent)  # python but no redis-server on PATH
    result = subprocess.run([sys.executable, "-m", "arena.cli", "up"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "apt-get install" in result.stdout + result.stderr
