"""`arena up` as a user runs it: the whole stack starts and answers the official client; a
process killed while it serves is restarted and no accepted vote is lost or doubled; SIGTERM
(what Ctrl-C does to the launcher) stops every process it started.

The tests in the middle share one stack (module fixture): starting vLLM is the slow part."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from rich.console import Console
from sqlalchemy import create_engine, text

from arena.launcher import Backoff, ManagedProcess
from conftest import POSTGRES_URL
from feedback.archive import Archive
from testkit.processes import arena_up_env

pytestmark = pytest.mark.slow  # starts the whole stack

UP_TIMEOUT_S = 300
VLLM_RESTART_TIMEOUT_S = 300  # vLLM boots three Python processes; ~60-95 s on 2 busy cores
CHAT_RECOVERY_S = 20.0  # after the launcher reports vLLM ready again (replica sync: 3 s)
ARCHIVE_CATCH_UP_S = 60.0
RESERVE = 20  # battles created before the first vote
CHAT = {"model": "current", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BATTLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def stack_env(tmp_path: Path, tiny_model_dir: Path, gateways: int = 1, replicas: int = 1,
              **extra: str) -> dict[str, str]:
    """`arena up`'s environment on free ports (testkit.processes.arena_up_env)."""
    return arena_up_env(tmp_path, tiny_model_dir, gateways, replicas, **extra)


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


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields


def child_pid(parent: int, needle: str) -> int:
    """The launcher's direct child whose command line contains `needle`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (fields := _stat(int(proc.name))) and int(fields[1]) == parent:
            try:
                if needle.encode() in (proc / "cmdline").read_bytes().replace(b"\0", b" "):
                    return int(proc.name)
            except FileNotFoundError:
                continue
    raise AssertionError(f"no child of {parent} runs {needle!r}")


def group_members(pgid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (fields := _stat(int(p.name))) and int(fields[2]) == pgid]


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

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line containing `text` (waiting for it up to `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            if found := next((line for line in self.lines if text in line), None):
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen; output:\n{''.join(self.lines)[-4000:]}")
            time.sleep(0.2)


@dataclass
class Stack:
    env: dict[str, str]
    launcher: Launcher
    archive_url: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['ARENA_GATEWAY_PORT']}"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["ARENA_DATA_DIR"])


@contextmanager
def archive_schema() -> Iterator[str]:
    """The archive URL of a fresh PostgreSQL schema, dropped afterwards."""
    engine = create_engine(POSTGRES_URL)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@contextmanager
def launched(env: dict[str, str]) -> Iterator[Launcher]:
    """`arena up` with `env`, stopped (SIGTERM) at the end if it still runs."""
    launcher = Launcher(env)
    try:
        yield launcher
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.send_signal(signal.SIGTERM)
            launcher.proc.wait(timeout=90)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """One `arena up` for the module, archiving into a fresh PostgreSQL schema."""
    with archive_schema() as archive_url:
        env = stack_env(
            tmp_path_factory.mktemp("stack"), tiny_model_dir, ARENA_ARCHIVE_URL=archive_url,
            # Load without limits or training; a restarted archiver re-claims a dead one's
            # unacknowledged votes after 2 s instead of 30.
            ARENA_RATE_CHAT_PER_SESSION="0", ARENA_RATE_BATTLE_PER_SESSION="0",
            ARENA_RATE_VOTE_PER_SESSION="0", ARENA_LEARN_EVERY_VOTES="1000000000",
            ARENA_STREAM_CLAIM_IDLE_MS="2000", ARENA_RESTART_BACKOFF_S="0.5",
        )
        with launched(env) as launcher:
            yield Stack(env, launcher, archive_url)


def test_up_serves_the_openai_client(stack: Stack):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    assert any(stack.url in line for line in stack.launcher.lines)
    assert any("admin token generated" in line for line in stack.launcher.lines)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="current", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert reply.model == "base" and reply.choices[0].message.content
    assert len(processes_of(stack.data_dir)) >= 5  # redis, vllm (+engine), gateway, worker, …
    for name in ("redis", "vllm", "gateway", "worker", "consumers"):
        assert (stack.data_dir / "logs" / f"{name}.log").exists()
    assert (stack.data_dir / "redis" / "appendonlydir").exists()  # AOF persistence on


class ClientThreads:
    """Client threads (`self.threads`) that run from `with` until its end (`self.stop`)."""

    threads: list[threading.Thread]
    stop: threading.Event

    def __enter__(self) -> ClientThreads:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


@dataclass
class Load(ClientThreads):
    """Chat and battle + vote traffic through the gateway, as two client threads; records
    each chat's outcome and the battle id of every vote answered 2xx."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    chats: list[tuple[float, bool]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # no answer: outcome not known
    battles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=self._chat, daemon=True),
                        threading.Thread(target=self._vote, daemon=True)]

    def _chat(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.wait(0.2):
                try:
                    ok = http.post("/v1/chat/completions", json=CHAT).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.chats.append((time.monotonic(), ok))

    def _vote(self) -> None:
        """One battle created and one voted on per round, after a reserve of battles is
        filled: it keeps votes going while vLLM (which battles need) is down."""
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.wait(0.2):
                try:
                    created = http.post("/v1/battles", json=BATTLE)
                    if created.status_code == 200:
                        self.battles.append(created.json()["battle_id"])
                except httpx.HTTPError:
                    pass
                if not self.battles or (not self.accepted and len(self.battles) < RESERVE):
                    continue
                battle_id = self.battles.pop(0)
                try:
                    status = http.post(f"/v1/battles/{battle_id}/vote",
                                       json={"winner": "a"}).status_code
                except httpx.HTTPError:
                    self.unknown.append(battle_id)
                    continue
                if 200 <= status < 300:
                    self.accepted.append(battle_id)
                else:
                    self.refused.append(status)

    def wait_for_more_votes(self, when: str, timeout: float = 30.0) -> None:
        before, deadline = len(self.accepted), time.monotonic() + timeout
        while len(self.accepted) == before:
            assert time.monotonic() < deadline, f"no vote accepted {when}"
            time.sleep(0.1)

    def chat_failures_since(self, since: float) -> int:
        return sum(1 for at, ok in list(self.chats) if at >= since and not ok)

    def first_chat_ok_after(self, since: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok := [at for at, good in list(self.chats) if at > since and good]:
                return ok[0]
            time.sleep(0.1)
        raise AssertionError(f"no chat succeeded within {timeout:.0f}s")


def test_killed_processes_are_restarted_and_no_accepted_vote_is_lost(stack: Stack):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    launcher = stack.launcher
    figures: dict[str, float] = {}
    with Load(stack.url) as load:
        load.wait_for_more_votes("before the kills", timeout=120)

        # Consumers and worker: restarted, chat never fails meanwhile.
        for name, needle in (("consumers", "arena.cli consumers"), ("worker", "celery")):
            pid = child_pid(launcher.proc.pid, needle)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            line = launcher.wait_for(f"{name} exited (exit code -9, SIGKILL)", 30)
            assert re.search(r"restart in \d+\.\d+s", line)
            launcher.wait_for(f"{name} restarted", 120)
            figures[f"{name} restarted after (s)"] = time.monotonic() - killed_at
            assert child_pid(launcher.proc.pid, needle) != pid
            load.wait_for_more_votes(f"after {name} restarted")
            assert load.chat_failures_since(killed_at) == 0, f"chat failed while {name} died"

        # vLLM: its API server killed, its engine process orphaned; chat comes back.
        pid = child_pid(launcher.proc.pid, "vllm.entrypoints")
        group = group_members(pid)
        assert len(group) >= 2, "expected vLLM's API server and its engine process"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        launcher.wait_for("vllm exited (exit code -9, SIGKILL)", 30)
        ready = launcher.wait_for("vllm restarted", VLLM_RESTART_TIMEOUT_S)
        restarted_at = time.monotonic()
        figures["vllm restarted after (s)"] = restarted_at - killed_at
        figures["vllm boot (s)"] = float(re.search(r"ready in ([\d.]+)s", ready).group(1))
        assert not [p for p in group if _stat(p)], "the old vLLM group was left running"
        chat_back = load.first_chat_ok_after(restarted_at, CHAT_RECOVERY_S)
        figures["chat back after kill (s)"] = chat_back - killed_at
        assert load.chat_failures_since(killed_at) > 0  # it was down meanwhile
        load.wait_for_more_votes("after vLLM restarted")

    # Every vote answered 2xx is archived exactly once; nothing else is.
    assert load.unknown == [] and load.refused == [], (load.unknown, load.refused)
    accepted = set(load.accepted)
    assert len(accepted) == len(load.accepted)
    stored = archived_vote_ids(stack.archive_url, len(accepted))
    assert len(stored) == len(set(stored)) == len(accepted)
    assert set(stored) == accepted
    figures["votes accepted"] = len(accepted)
    print("supervision figures:", {k: round(v, 1) for k, v in figures.items()})


def archived_vote_ids(url: str, expected: int) -> list[str]:
    """The archive's vote ids, once it holds `expected` votes (or the wait is over)."""
    archive = Archive(url, create=False)
    deadline = time.monotonic() + ARCHIVE_CATCH_UP_S
    try:
        while True:
            ids = [stored.record.vote_id for stored in archive.iter_votes()]
            if len(ids) >= expected or time.monotonic() > deadline:
                return ids
            time.sleep(0.5)
    finally:
        archive.close()


def test_sigterm_stops_everything_with_no_orphan(stack: Stack):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    started = time.monotonic()
    stack.launcher.proc.send_signal(signal.SIGTERM)
    stack.launcher.proc.wait(timeout=60)
    stop_s = time.monotonic() - started
    assert stack.launcher.proc.returncode == 0
    assert stop_s < 20, f"stopping took {stop_s:.1f}s"
    time.sleep(1)
    assert processes_of(stack.data_dir) == [], "orphans left behind"


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


def test_log_pump_survives_any_line(tmp_path):
    """Markup-like text and bytes that are not UTF-8, then more output than a pipe holds:
    every line is logged and printed as it is, and the child never blocks on its pipe."""
    script = ("import sys; out = sys.stdout.buffer; "
              "out.write(b'[/x] [bold]not markup[/] :smile: \\xff\\xfe\\n'); "
              "out.write(b''.join(b'filler %06d\\n' % i for i in range(10000))); "
              "out.write(b'last line\\n')")
    console_out = io.StringIO()
    console = Console(file=console_out, width=200, color_system=None)
    process = ManagedProcess("pump", [sys.executable, "-c", script], dict(os.environ),
                             lambda: True)
    process.start(tmp_path / "logs", console)
    assert process.proc is not None
    assert process.proc.wait(timeout=60) == 0  # it would block for ever once the pipe filled
    log = tmp_path / "logs" / "pump.log"
    deadline = time.monotonic() + 10
    while "last line" not in log.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "the pump stopped before the end"
        time.sleep(0.05)
    logged = log.read_text(encoding="utf-8").splitlines()
    assert logged[0] == "[/x] [bold]not markup[/] :smile: \ufffd\ufffd"
    assert len(logged) == 10002
    assert "pump | [/x] [bold]not markup[/] :smile: \ufffd\ufffd" in console_out.getvalue()


def test_restart_backoff_doubles_up_to_the_cap_and_resets_after_a_long_run():
    backoff = Backoff(first_s=1.0, max_s=5.0, reset_s=60.0)
    assert [backoff.next_delay(uptime_s=2.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.next_delay(uptime_s=61.0) == 1.0
    assert backoff.next_delay(uptime_s=0.5) == 2.0
