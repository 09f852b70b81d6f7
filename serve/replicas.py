"""Hot swap, gateway side: a version is loaded into every vLLM replica, under its own immutable
name, before the `current` alias (one Redis key) points at it; retired versions are unloaded;
a background task keeps every replica holding every live version, so a replica that
restarted gets them back on its first good health check. Nothing restarts.

Requests already running finish on the version they started with: the gateway resolves
`current` once per request (serve/versions.py), and vLLM keeps an adapter in use until its
requests end even when its name is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.manifest import Manifest, ManifestError, verify
from deploy.registry import BASE, Registry, VersionRecord
from deploy.states import TransitionError, check_promote
from serve.errors import APIError
from serve.upstream import Replica, ReplicaPool
from serve.versions import VersionView

log = logging.getLogger("arena.deploy")


class LoadFailed(Exception):
    """A replica refused the version (or none could be reached); `current` was not changed."""

    def __init__(self, version: str, failures: dict[str, str]) -> None:
        self.version, self.failures = version, failures
        detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
        super().__init__(f"could not load {version} into the model servers ({detail})")


@dataclass
class SwapResult:
    action: str
    id: str
    before: dict[str, Any]
    after: dict[str, Any]
    loaded_on: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_files(record: VersionRecord) -> None:
    """The version folder still matches the hashes in its record (raises ManifestError)."""
    if record.path is not None and record.files:
        verify(Path(record.path), Manifest(files=record.files))


async def replica_adapters(pool: ReplicaPool, replica: Replica) -> dict[str, str] | None:
    """The adapters a replica really holds, name -> folder (its /v1/models), or None if it does
    not answer. Also corrects the pool's record of them: a replica that restarted has none."""
    try:
        response = await pool.client.get(f"{replica.url}/v1/models", timeout=5.0)
        response.raise_for_status()
        held = {m["id"]: m.get("root") or "" for m in response.json().get("data", [])}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    held.pop(BASE, None)
    replica.loaded = set(held)
    return held


async def _load_on(pool: ReplicaPool, replica: Replica, record: VersionRecord,
                   held: dict[str, str]) -> None:
    """Load `record` on `replica`. A name held with other weights (a folder other than the
    record's: left over from an earlier registry, say) is stale: replace it, never reuse it."""
    if record.id in held and record.path and held[record.id] not in ("", record.path):
        log.warning("%s on %s is %s, not %s: replacing the stale adapter", record.id,
                    replica.url, held[record.id], record.path)
        await pool.unload(replica, record.id)
    await pool.ensure_loaded(replica, record.id, record.path)


async def load_everywhere(pool: ReplicaPool, record: VersionRecord,
                          require_one: bool = True) -> list[str]:
    """Load `record` into every replica that answers; return their URLs. Raise LoadFailed if a
    replica refuses it, or (with require_one) if no replica could be reached."""
    try:
        await asyncio.to_thread(check_files, record)
    except ManifestError as error:
        raise LoadFailed(record.id, {"version store": str(error)}) from error

    async def one(replica: Replica) -> str | None:
        held = await replica_adapters(pool, replica)
        if held is None:
            return "unreachable"
        try:
            await _load_on(pool, replica, record, held)
        except APIError as error:
            return error.message
        except httpx.HTTPError as error:
            return f"unreachable ({error!r})"
        return None

    outcomes = await asyncio.gather(*(one(r) for r in pool.replicas))
    failures = {r.url: why for r, why in zip(pool.replicas, outcomes, strict=True) if why}
    loaded = [r.url for r, why in zip(pool.replicas, outcomes, strict=True) if why is None]
    refused = {url: why for url, why in failures.items() if not why.startswith("unreachable")}
    if refused or (require_one and not loaded):
        raise LoadFailed(record.id, refused or failures)
    for url, why in failures.items():
        log.warning("%s not loaded on %s (%s); the replica sync will load it later",
                    record.id, url, why)
    return loaded


async def promote(pool: ReplicaPool, registry: Registry, version: str,
                  actor: str) -> SwapResult:
    """Load `version` everywhere, then flip `current` to it (one Redis transaction)."""
    started = time.perf_counter()
    record = await asyncio.to_thread(registry.get, version)
    if record.kind == "reward":
        raise TransitionError(f"{version} is a reward model, not a policy")
    check_promote(version, record.state)  # refuse before loading anything
    loaded = await load_everywhere(pool, record)
    old, new = await asyncio.to_thread(registry.promote, version, actor)
    return SwapResult("promote", new,
                      before={"current": old, "states": {new: record.state, old: "current"}},
                      after={"current": new, "states": {new: "current", old: "candidate"}},
                      loaded_on=loaded, seconds=time.perf_counter() - started)


async def rollback(pool: ReplicaPool, registry: Registry, actor: str) -> SwapResult:
    """Make the previous current version current again (loaded everywhere first). The flip
    checks that `current` and the target are still what was loaded (409 if a promote or
    rollback came in between)."""
    started = time.perf_counter()
    current = await asyncio.to_thread(registry.current)
    target = await asyncio.to_thread(registry.rollback_target)
    loaded = await load_everywhere(pool, await asyncio.to_thread(registry.get, target))
    old, new = await asyncio.to_thread(registry.rollback, actor, expected_current=current,
                                       expected_target=target)
    return SwapResult("rollback", new,
                      before={"current": old, "states": {new: "candidate", old: "current"}},
                      after={"current": new, "states": {new: "current", old: "candidate"}},
                      loaded_on=loaded, seconds=time.perf_counter() - started)


async def retire(pool: ReplicaPool, registry: Registry, version: str, actor: str) -> SwapResult:
    """Take `version` out of serving and battles, and unload it (its files stay)."""
    started = time.perf_counter()
    before, after = await asyncio.to_thread(registry.retire, version, actor)
    current = await asyncio.to_thread(registry.current)
    await pool.unload_everywhere(version)
    return SwapResult("retire", version,
                      before={"current": current, "states": {version: before}},
                      after={"current": current, "states": {version: after}},
                      seconds=time.perf_counter() - started)


# --- keeping replicas in step --------------------------------------------------------------
async def sync_replicas(pool: ReplicaPool, versions: VersionView) -> None:
    """One pass: every replica that is healthy gets each live policy it lacks, and loses the
    retired ones it still holds (e.g. reloaded by a request that raced the retirement)."""
    records = [r for r in await versions.all() if r.kind == "policy" and r.path]
    live = [r for r in records if r.state != "retired"]
    retired = {r.id for r in records if r.state == "retired"}
    health = await pool.health()

    async def one(replica: Replica) -> None:
        if not health.get(replica.url):
            return
        held = await replica_adapters(pool, replica)
        if held is None:
            return
        for record in live:
            if held.get(record.id) in (record.path, ""):
                continue
            try:
                await asyncio.to_thread(check_files, record)
                await _load_on(pool, replica, record, held)
                log.info("replica sync: loaded %s on %s", record.id, replica.url)
            except (APIError, ManifestError, httpx.HTTPError) as error:
                log.warning("replica sync: could not load %s on %s: %s",
                            record.id, replica.url, error)
        for version in sorted(set(held) & retired):
            try:
                await pool.unload(replica, version)
                log.info("replica sync: unloaded retired %s from %s", version, replica.url)
            except httpx.HTTPError as error:
                log.warning("replica sync: could not unload %s from %s: %s",
                            version, replica.url, error)

    await asyncio.gather(*(one(r) for r in pool.replicas))


async def replica_sync_loop(pool: ReplicaPool, versions: VersionView, interval_s: float) -> None:
    """Run `sync_replicas` every `interval_s` seconds until cancelled (gateway lifespan)."""
    while True:
        try:
            await sync_replicas(pool, versions)
        except Exception:  # noqa: BLE001 - never let the loop die; Redis may be restarting
            log.exception("replica sync failed; retrying")
        await asyncio.sleep(interval_s)
