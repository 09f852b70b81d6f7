"""Run our own `redis-server` with append-only persistence (used by the launcher and tests)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

REDIS_HINT = (
    "redis-server is not installed. On Debian/Ubuntu: `sudo apt-get install -y redis-server` "
    "(`make up` does this when run as root), or set ARENA_REDIS_URL to an existing Redis."
)


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(REDIS_HINT)
    return path


def redis_server_command(port: int, data_dir: Path, appendfsync: str = "always") -> list[str]:
    """AOF on, RDB snapshots off: every write is in the append-only file before Redis answers
    (with appendfsync=always), so an accepted vote survives a Redis crash or restart."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]


def wait_for_redis(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url)
    while True:
        try:
            if client.ping():
                return
        except (redis.ConnectionError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def start_redis(port: int, data_dir: Path, appendfsync: str = "always") -> subprocess.Popen:
    proc = subprocess.Popen(
        redis_server_command(port, data_dir, appendfsync),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_redis(f"redis://127.0.0.1:{port}/0")
    return proc
