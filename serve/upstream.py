"""The pool of vLLM replicas behind the gateway: spread requests round-robin, skip a replica
that is down (for a short back-off), and make sure the adapter of the requested version is
loaded on the replica that serves it (a replica that restarted has none loaded).

A version that also runs on its merged weights (serve/merged_replica.py; `merged_lookup`
says where, per request) is sent to that replica first, and to the LoRA replicas if it is
down or no longer serves the version."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from serve.errors import APIError

DOWN_BACKOFF_S = 5.0
RETRY_AFTER_S = "5"
BASE_NAME = "base"


@dataclass
class Replica:
    url: str
    down_until: float = 0.0
    loaded: set[str] = field(default_factory=set)  # LoRA names we know are loaded there

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        self.down_until = time.monotonic() + DOWN_BACKOFF_S
        self.loaded.clear()  # it may come back restarted, with nothing loaded


# Failures that say "this replica is not there" (or died under the request, before it
# answered: a generation has no side effect, so another replica may run it): try the next one.
REPLICA_DOWN_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                       httpx.ReadError, httpx.WriteError)


class ReplicaPool:
    def __init__(self, urls: list[str], timeout_s: float, max_connections: int = 512,
                 pool_timeout_s: float = 5.0,
                 merged_lookup: Callable[[str], Awaitable[str | None]] | None = None) -> None:
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.merged_lookup = merged_lookup
        self.merged: dict[str, Replica] = {}  # merged-weights replicas seen, by URL
        self._cycle = itertools.cycle(range(len(self.replicas)))
        self._load_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # One client, created up front: creating clients while requests are in flight was
        # seen to block for seconds (stack notes).
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=2.0, pool=pool_timeout_s),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=min(128, max_connections)),
        )

    async def close(self) -> None:
        await self.client.aclose()

    def _order(self) -> list[Replica]:
        start = next(self._cycle)
        ordered = self.replicas[start:] + self.replicas[:start]
        return [r for r in ordered if r.up] + [r for r in ordered if not r.up]

    async def _route(self, version: str) -> list[Replica]:
        """The replicas to try for `version`, in order: its merged replica (if up), then the
        LoRA replicas."""
        order = self._order()
        if self.merged_lookup is None or version == BASE_NAME:
            return order
        url = await self.merged_lookup(version)
        if url is None:
            return order
        merged = self.merged.setdefault(url, Replica(url, loaded={version}))
        merged.loaded = {version}  # the one name it serves; no adapter to load there
        return [merged, *order] if merged.up else order

    def _is_merged(self, replica: Replica) -> bool:
        return replica.url in self.merged and replica not in self.replicas

    async def ensure_loaded(self, replica: Replica, version: str, path: str | None) -> None:
        """Load the adapter of `version` (folder `path`; None for the base) on `replica`."""
        if version == BASE_NAME or path is None or version in replica.loaded:
            return
        lock = self._load_locks.setdefault((replica.url, version), asyncio.Lock())
        async with lock:
            if version in replica.loaded:
                return
            response = await self.client.post(
                f"{replica.url}/v1/load_lora_adapter",
                json={"lora_name": version, "lora_path": path},
            )
            # 400 "already loaded" is success for us: the name is immutable, so it is ours.
            if response.status_code == 200 or "already" in response.text:
                replica.loaded.add(version)
                return
            raise APIError(503, f"could not load version {version} on a replica: "
                                f"{response.text[:300]}", "adapter_load_failed",
                           headers={"Retry-After": RETRY_AFTER_S})

    async def unload(self, replica: Replica, version: str) -> None:
        """Unload `version` from `replica` (raises httpx.HTTPError if it cannot be reached)."""
        await self.client.post(f"{replica.url}/v1/unload_lora_adapter",
                               json={"lora_name": version})
        replica.loaded.discard(version)

    async def unload_everywhere(self, version: str) -> None:
        for replica in self.replicas:
            with contextlib.suppress(httpx.HTTPError):
                await self.unload(replica, version)
            replica.loaded.discard(version)

    @staticmethod
    def _lost_adapter(response: httpx.Response, replica: Replica, version: str) -> bool:
        """vLLM answers 404 for an adapter it does not have: the replica restarted since we
        loaded it. Forget it so the caller loads it again."""
        if response.status_code == 404 and version != BASE_NAME and version in replica.loaded:
            replica.loaded.discard(version)
            return True
        return False

    def _unavailable(self, last_error: Exception | None) -> APIError:
        return APIError(503, f"no model server is available right now ({last_error}); retry "
                             "shortly", "upstream_unavailable",
                        headers={"Retry-After": RETRY_AFTER_S})

    @staticmethod
    def _failed(error: httpx.HTTPError) -> APIError:
        """What a client is told when a model server request fails (not a dead replica)."""
        if isinstance(error, httpx.PoolTimeout):
            return APIError(503, "The gateway has no free connection to the model servers "
                                 "(too many answers in progress); retry shortly.",
                            "upstream_busy", headers={"Retry-After": RETRY_AFTER_S})
        if isinstance(error, httpx.TimeoutException):
            return APIError(504, f"The model server did not answer in time ({error!r}); retry, "
                                 "or ask for fewer tokens.", "upstream_timeout")
        return APIError(502, f"The model server request failed ({error!r}); retry.",
                        "upstream_failed")

    async def post(self, path: str, body: dict, version: str,
                   adapter: str | None = None) -> httpx.Response:
        """POST to the first healthy replica; connection failures move on to the next."""
        last_error: Exception | None = None
        for replica in await self._route(version):
            try:
                await self.ensure_loaded(replica, version, adapter)
                response = await self.client.post(f"{replica.url}{path}", json=body)
                if self._is_merged(replica) and response.status_code == 404:
                    continue  # replaced by another version's replica since the lookup
                if self._lost_adapter(response, replica, version):
                    await self.ensure_loaded(replica, version, adapter)
                    response = await self.client.post(f"{replica.url}{path}", json=body)
                return response
            except REPLICA_DOWN_ERRORS as e:
                replica.mark_down()
                last_error = e
            except httpx.HTTPError as e:
                raise self._failed(e) from e
        raise self._unavailable(last_error)

    @asynccontextmanager
    async def stream(self, path: str, body: dict, version: str,
                     adapter: str | None = None) -> AsyncIterator[httpx.Response]:
        """Open a streaming POST on the first healthy replica. Closing the response (e.g. the
        client went away) closes the connection, and vLLM aborts the generation."""
        last_error: Exception | None = None
        for replica in await self._route(version):
            try:
                await self.ensure_loaded(replica, version, adapter)
                request = self.client.build_request("POST", f"{replica.url}{path}", json=body)
                response = await self.client.send(request, stream=True)
                if response.status_code == 404 and version != BASE_NAME:
                    await response.aread()
                    if self._is_merged(replica):
                        await response.aclose()
                        continue  # replaced by another version's replica since the lookup
                    if self._lost_adapter(response, replica, version):
                        await response.aclose()
                        await self.ensure_loaded(replica, version, adapter)
                        response = await self.client.send(request, stream=True)
            except REPLICA_DOWN_ERRORS as e:
                replica.mark_down()
                last_error = e
                continue
            except httpx.HTTPError as e:
                raise self._failed(e) from e
            try:
                yield response
            finally:
                await response.aclose()
            return
        raise self._unavailable(last_error)

    async def health(self) -> dict[str, bool]:
        async def one(replica: Replica) -> bool:
            try:
                response = await self.client.get(f"{replica.url}/health", timeout=2.0)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                replica.mark_down()
            else:
                replica.down_until = 0.0
            return ok

        results = await asyncio.gather(*(one(r) for r in self.replicas))
        return {r.url: ok for r, ok in zip(self.replicas, results, strict=True)}
