"""Small network helpers shared by the launcher's callers, tests and benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

from core.net import free_port

__all__ = ["free_port", "free_port_ranges", "wait_http"]


def free_port_ranges(*sizes: int) -> list[int]:
    """For each size n, the first of n consecutive TCP ports on 127.0.0.1, all free right now
    and no two ranges overlapping: every port is held until all are chosen (the OS may hand
    the same free port to two `free_port` calls in a row). A topology's parts take port,
    port+1, …: `gateway, vllm, redis = free_port_ranges(2, 2, 1)`."""
    held: list[socket.socket] = []
    firsts: list[int] = []
    try:
        for size in sizes:
            while True:
                block: list[socket.socket] = []
                try:
                    first = free_port()
                    for port in range(first, first + size):
                        sock = socket.socket()
                        block.append(sock)
                        sock.bind(("127.0.0.1", port))
                except OSError:
                    for sock in block:
                        sock.close()
                    continue
                held.extend(block)
                firsts.append(first)
                break
        return firsts
    finally:
        for sock in held:
            sock.close()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 200; fail early if `proc` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout}s")
