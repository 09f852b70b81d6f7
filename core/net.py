"""Network helpers for the product's own processes."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now (another process may take it before it is
    used: callers that start several servers hold theirs, see testkit.net)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
