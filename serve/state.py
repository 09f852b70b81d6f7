"""What one gateway process holds: settings, Redis, the replica pool, the version view,
the rate limiter, metrics, the voter-address hash, and background tasks (kept referenced
until they finish)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from arena.settings import Settings
from feedback.vote_stream import VoteAcceptor
from serve.metrics import GatewayMetrics
from serve.rate_limit import RateLimiter
from serve.upstream import ReplicaPool
from serve.versions import VersionView
from serve.voter_address import VoterAddress


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    pool: ReplicaPool
    versions: VersionView
    limiter: RateLimiter
    metrics: GatewayMetrics
    vote_acceptor: VoteAcceptor
    voter_address: VoterAddress  # the hashed client address a vote is also scored under
    archive: Any = None  # feedback.archive.Archive, opened on first use (serve/session_data.py)
    worker_ok: bool | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
