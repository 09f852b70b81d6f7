"""`arena up`: start the whole stack in order, health-check each process, stream their logs,
restart (with back-off) any process that dies while the rest keeps serving, and stop
everything (whole process groups, no orphans) on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.text import Text

from arena.logfiles import RotatingLogFile
from arena.redis_server import redis_server_command
from core.hardware import core_shares
from core.settings import Settings
from core.vllm_server import vllm_command

STOP_GRACE_S = 8.0
LOG_TAIL_LINES = 40
HEALTH_POLL_S = 0.25
PREFIX_COLOURS = {"redis": "red", "vllm": "magenta", "gateway": "cyan", "worker": "yellow",
                  "consumers": "green", "merged": "blue"}


class StartupError(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    """One child process: its command, how to tell it is ready, and the tail of its log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    is_ready: Callable[[], bool]
    start_timeout_s: float = 60.0
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    # Held while (re)starting or stopping, so a restart never races the final stop.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, logs_dir: Path, console: Console) -> None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        # A new session = a new process group: stopping it also stops grandchildren
        # (vLLM's engine core, Celery's pool). Bytes that are not UTF-8 become U+FFFD
        # instead of ending the log pump.
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, encoding="utf-8",
            errors="replace", bufsize=1,
        )
        self.started_at = time.monotonic()
        # Rotated by size, so a chatty child cannot fill the disk.
        log_file = RotatingLogFile(logs_dir / f"{self.name}.log")
        threading.Thread(target=self._pump, args=(self.proc, log_file, console),
                         name=f"log-{self.name}", daemon=True).start()

    def _pump(self, proc: subprocess.Popen, log_file: RotatingLogFile,
              console: Console) -> None:
        colour = PREFIX_COLOURS.get(self.name.split("-")[0], "white")
        prefix = Text(f"{self.name:>11} |", style=colour)
        assert proc.stdout is not None
        with log_file:
            for line in proc.stdout:
                line = line.rstrip("\n")
                self.tail.append(line)
                log_file.write(line + "\n")
                log_file.flush()
                # A Text is printed as it is: "[/x]" in a child's line is not rich markup. A
                # terminal gone away must not stop the draining (the child would block).
                with contextlib.suppress(OSError):
                    console.print(Text.assemble(prefix, " ", line), highlight=False,
                                  soft_wrap=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise StartupError(f"{self.name} exited with code {self.proc.returncode} at start")
            try:
                if self.is_ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(HEALTH_POLL_S)
        raise StartupError(f"{self.name} did not become ready within {self.start_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.kill_group()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.kill_group()

    def kill_group(self) -> None:
        """Kill whatever the leader left in its group (e.g. a stuck or orphaned engine
        process): the group id stays reserved while any member lives, so this hits only ours."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class Backoff:
    """Delay before a restart: doubles with each quick death up to a cap; a process that ran
    `reset_s` before dying starts over from the first delay."""

    first_s: float
    max_s: float
    reset_s: float
    deaths: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        return cls(settings.restart_backoff_s, settings.restart_backoff_max_s,
                   settings.restart_backoff_reset_s)

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.reset_s:
            self.deaths = 0
        delay = min(self.first_s * 2**self.deaths, self.max_s)
        if delay < self.max_s:  # stop counting at the cap (2**deaths stays small)
            self.deaths += 1
        return delay


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, {signal.Signals(-code).name}"
    return f"exit code {code}"


def supervise(process: ManagedProcess, backoff: Backoff, logs_dir: Path, console: Console,
              stopping: threading.Event) -> None:
    """Restart `process` each time it dies, after the back-off, until the stack stops."""
    while True:
        assert process.proc is not None
        code = process.proc.wait()
        if stopping.is_set():
            return
        process.kill_group()
        uptime = time.monotonic() - process.started_at
        delay = backoff.next_delay(uptime)
        console.print(f"[bold red]{process.name} exited[/] ({describe_exit(code)}) after "
                      f"{uptime:.0f}s; restart in {delay:.1f}s", soft_wrap=True)
        _print_tail(console, process)
        if stopping.wait(delay):
            return
        with process.lock:
            if stopping.is_set():
                return
            process.start(logs_dir, console)
        try:
            process.wait_ready()
        except StartupError as error:
            if stopping.is_set():
                return
            console.print(f"[bold red]restart failed:[/] {error}", soft_wrap=True)
            with process.lock:
                process.stop()
            continue
        console.print(f"[bold green]{process.name} restarted[/], ready in "
                      f"{time.monotonic() - process.started_at:.1f}s", soft_wrap=True)


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == 200


def _redis_ok(url: str) -> Callable[[], bool]:
    return lambda: bool(redis.Redis.from_url(url, socket_timeout=1).ping())


def _worker_ok(settings: Settings, node: str) -> Callable[[], bool]:
    """This worker (Celery node `node`, e.g. learner-2@host) answers a ping."""
    def check() -> bool:
        from learner.celery_app import make_celery

        return bool(make_celery(settings).control.ping(destination=[node], timeout=1.0))

    return check


def child_env(settings: Settings) -> dict[str, str]:
    """Children build their own Settings from the environment: pass the effective values
    explicitly so they all agree with the launcher (e.g. the Redis URL it chose)."""
    env = dict(os.environ)
    env["ARENA_DATA_DIR"] = str(settings.data_dir.resolve())
    env["ARENA_REDIS_URL"] = settings.effective_redis_url
    env["ARENA_BASE_MODEL"] = str(settings.base_model_path.resolve())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gateway_command(settings: Settings, python: str = sys.executable) -> list[str]:
    """The gateway: uvicorn on the app factory, at the settings' address."""
    return [python, "-m", "uvicorn", "serve.app:create_app", "--factory", "--host",
            settings.gateway_host, "--port", str(settings.gateway_port), "--no-access-log",
            "--no-proxy-headers"]  # the app trusts X-Forwarded-For per ARENA_TRUSTED_PROXIES


def worker_command(python: str = sys.executable, name: str = "learner@%h") -> list[str]:
    """The learner's Celery worker: one task at a time (training takes the machine)."""
    return [python, "-m", "celery", "-A", "learner.worker:app", "worker", "--concurrency", "1",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "-n", name]


def numbered(name: str, i: int) -> str:
    """The first of a kind keeps the plain name (its log is logs/<name>.log), then name-2, …"""
    return name if i == 0 else f"{name}-{i + 1}"


def plan_processes(settings: Settings) -> list[ManagedProcess]:
    """Every process `arena up` runs, in start order, as many of each as the topology says."""
    env = child_env(settings)
    redis_url = settings.effective_redis_url
    processes: list[ManagedProcess] = []
    if settings.redis_url is None:
        argv = redis_server_command(
            settings.redis_port, settings.data_dir / "redis", settings.redis_appendfsync
        )
        processes.append(ManagedProcess("redis", argv, env, _redis_ok(redis_url), 15))
    if not settings.vllm_urls:
        # Several replicas on this machine: each its own share of the cores (or none pinned).
        shares = core_shares(settings.vllm_replicas) if settings.vllm_replicas > 1 else None
        for i, port in enumerate(settings.launched_vllm_ports):
            omp_bind = "auto" if settings.vllm_replicas == 1 else (
                shares[i] if shares else "nobind")
            argv, vllm_env = vllm_command(settings, settings.base_model_path, port,
                                          omp_bind=omp_bind)
            vllm_env.update({k: v for k, v in env.items() if k.startswith("ARENA_")})
            processes.append(ManagedProcess(
                numbered("vllm", i), argv, vllm_env,
                _http_ok(f"http://127.0.0.1:{port}/health"), settings.vllm_start_timeout_s))
    python = sys.executable
    for i, (port, url) in enumerate(zip(settings.gateway_ports, settings.gateway_urls,
                                        strict=True)):
        at_port = settings.model_copy(update={"gateway_port": port})
        processes.append(ManagedProcess(numbered("gateway", i), gateway_command(at_port, python),
                                        env, _http_ok(f"{url}/livez"), 60))
    for i in range(settings.workers):
        node = numbered("learner", i)  # Celery expands %h to the host name
        processes.append(ManagedProcess(
            numbered("worker", i), worker_command(python, f"{node}@%h"), env,
            _worker_ok(settings, f"{node}@{socket.gethostname()}"), 90))
    for i in range(settings.consumer_processes):
        processes.append(ManagedProcess(numbered("consumers", i),
                                        [python, "-m", "arena.cli", "consumers"], env,
                                        lambda: True, 5))
    if settings.merged_current:
        processes.append(ManagedProcess(
            "merged", [python, "-m", "arena.cli", "merged-replica"], env, lambda: True, 5,
        ))
    return processes


def run_stack(settings: Settings, console: Console) -> int:
    processes = plan_processes(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started: list[ManagedProcess] = []
    try:
        for process in processes:
            if stopping.is_set():
                return 130
            console.print(f"[bold]starting {process.name}[/] …")
            t0 = time.monotonic()
            process.start(settings.logs_dir, console)
            started.append(process)
            process.wait_ready()
            console.print(f"[bold green]{process.name} ready[/] in {time.monotonic() - t0:.1f}s")
            # Supervised from now on: a later death restarts it, the others keep serving.
            threading.Thread(
                target=supervise, name=f"supervise-{process.name}", daemon=True,
                args=(process, Backoff.from_settings(settings), settings.logs_dir, console,
                      stopping),
            ).start()
        console.print(f"\n[bold green]rlhf-arena is up:[/] {' '.join(settings.gateway_urls)}\n"
                      f"  chat UI {settings.gateway_url}/   API {settings.gateway_url}/v1\n"
                      "  Ctrl-C stops everything.\n")
        while not stopping.wait(0.5):  # with a timeout: signal handlers run in between
            pass
        return 0
    except StartupError as error:
        console.print(f"[bold red]start-up failed:[/] {error}")
        _print_tail(console, started[-1])
        return 1
    finally:
        stopping.set()  # before any stop: no supervisor restarts what is being stopped
        console.print("[bold]stopping[/] …")
        for process in reversed(started):
            with process.lock:
                process.stop()
        console.print("[bold]all processes stopped[/]")


def _print_tail(console: Console, process: ManagedProcess) -> None:
    console.print(f"[bold]last lines of {process.name}'s log[/] "
                  f"(full log: logs/{process.name}.log):")
    for line in list(process.tail):
        console.print(f"  {line}", markup=False, emoji=False, highlight=False)
