"""What one gateway process holds: settings, Redis, the replica pool, the version view and
registry, the operator token, the rate limiter, metrics, the voter-address hash, and
background tasks (kept referenced until they finish)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from core.settings import Settings
from deploy.registry import Registry
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
    registry: Registry  # on a synchronous Redis client: the operator API's writes
    admin_token: str  # the operator token, resolved once (settings or the data dir's file)
    archive: Any = None  # feedback.archive.Archive, opened on first use (serve/session_data.py)
    worker_ok: bool | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # battle pairs

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
