"""The gateway's read side of the version registry (deploy/registry.py), on async Redis:
resolve a requested model name (`current` or a version id) per request, list live versions."""

from __future__ import annotations

import redis.asyncio as aioredis

from core.text import as_str
from deploy.registry import (
    BASE,
    CURRENT_ALIAS,
    CURRENT_KEY,
    VERSIONS_KEY,
    VersionRecord,
    answers_chats,
    records_in_order,
)
from serve.errors import APIError
from serve.merged_serving import MERGED_KEY, MergedServing


class VersionView:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def current(self) -> str:
        return as_str(await self.redis.get(CURRENT_KEY)) or BASE

    async def merged(self) -> MergedServing | None:
        """The version served from merged weights, and where (serve/merged_replica.py)."""
        return MergedServing.from_json(await self.redis.get(MERGED_KEY))

    async def merged_url(self, version: str) -> str | None:
        """Where `version` runs on merged weights, or None (LoRA path only)."""
        merged = await self.merged()
        return merged.url if merged is not None and merged.version == version else None

    async def all(self) -> list[VersionRecord]:
        return records_in_order(await self.redis.hvals(VERSIONS_KEY))

    async def live(self) -> list[VersionRecord]:
        """Versions that serve chats and battles: base and policies not retired."""
        return [r for r in await self.all() if answers_chats(r)]

    async def resolve(self, name: str) -> VersionRecord:
        """The concrete version for a request; `current` is read once, here, so a request
        finishes on the version it started on even if the alias flips meanwhile."""
        version = await self.current() if name == CURRENT_ALIAS else name
        raw = await self.redis.hget(VERSIONS_KEY, version)
        record = VersionRecord.from_json(raw) if raw else None
        if record is None or record.kind == "reward" or record.state == "retired":
            live = ", ".join([CURRENT_ALIAS] + [r.id for r in await self.live()])
            why = "is retired" if record is not None and record.state == "retired" else \
                "does not exist"
            raise APIError(404, f"The model '{name}' {why}. Available models: {live}.",
                           "model_not_found", "model")
        return record
