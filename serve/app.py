"""The gateway: FastAPI app factory (`uvicorn serve.app:create_app --factory`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from core.redis_durability import require_durable
from core.secrets import admin_token, bearer_matches, session_secret
from core.settings import Settings
from deploy.registry import Registry
from feedback.stats import stream_figures
from feedback.vote_stream import VoteAcceptor
from learner.celery_app import make_celery
from learner.trigger import VOTES_WAITING_KEY
from serve import (
    admin_routes,
    battles,
    chat,
    leaderboard,
    pages,
    report_routes,
    session_data,
    votes,
)
from serve.bodies import BodySizeLimit
from serve.deps import gateway_state
from serve.errors import error_response, error_responses, install_error_handlers
from serve.metrics import GatewayMetrics
from serve.rate_limit import RateLimiter
from serve.recent_errors import ErrorRing, RecordErrors
from serve.replicas import replica_sync_loop
from serve.sessions import SessionMiddleware
from serve.state import GatewayState
from serve.upstream import ReplicaPool
from serve.versions import VersionView
from serve.voter_address import VoterAddress

log = logging.getLogger("arena.gateway")
BACKGROUND_STOP_S = 5.0  # how long shutdown waits for the background tasks to end


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sync_client = redis.Redis.from_url(settings.effective_redis_url)
        try:  # a Redis that can lose accepted votes stops the start (VolatileRedis)
            shown_url = str(settings.redacted()["redis (effective)"])  # no password
            for warning in require_durable(sync_client, shown_url, settings.allow_volatile_redis):
                log.warning("redis: %s", warning)
            registry = Registry(sync_client, settings.data_dir / "audit.log")
            registry.ensure_base()
        except BaseException:
            sync_client.close()
            raise
        client = aioredis.Redis.from_url(settings.effective_redis_url)
        versions = VersionView(client)
        gw = GatewayState(
            settings=settings, redis=client,
            pool=ReplicaPool(settings.effective_vllm_urls, settings.request_timeout_s,
                             settings.upstream_max_connections, settings.upstream_pool_timeout_s,
                             merged_lookup=versions.merged_url),
            versions=versions, limiter=RateLimiter(client), metrics=GatewayMetrics(),
            vote_acceptor=VoteAcceptor(client),
            voter_address=VoterAddress(session_secret(settings), bool(settings.trusted_proxies)),
            registry=registry, admin_token=admin_token(settings),
        )
        app.state.gateway = gw
        watcher = asyncio.create_task(_watch_worker(gw))
        syncer = asyncio.create_task(  # deploy: every replica holds every live version
            replica_sync_loop(gw.pool, gw.versions, settings.replica_sync_interval_s))
        try:
            yield
        finally:
            watcher.cancel()
            syncer.cancel()
            # Bounded: a library call that swallows the cancellation (seen while the first
            # replica sync pass was running) must not keep the gateway from stopping.
            await asyncio.wait({watcher, syncer}, timeout=BACKGROUND_STOP_S)
            await gw.pool.close()
            await client.aclose()
            sync_client.close()
            if gw.archive is not None:
                gw.archive.close()

    app = FastAPI(title="rlhf-arena gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    # The vote path skips the body limit: it has its own, smaller one.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(votes.VoteFastPath)  # the vote is the hot path: plain ASGI
    app.add_middleware(SessionMiddleware, secret=session_secret(settings))
    if settings.trusted_proxies:  # runs first: the client address every limit counts
        app.add_middleware(ProxyHeadersMiddleware,
                           trusted_hosts=[str(net) for net in settings.trusted_proxies])
    app.state.recent_errors = ErrorRing()  # GET /admin/errors (operator console)
    app.add_middleware(RecordErrors, ring=app.state.recent_errors)
    app.include_router(chat.router)
    app.include_router(battles.router)
    pages.install(app)
    app.include_router(leaderboard.router)
    app.include_router(admin_routes.router, responses=error_responses(*admin_routes.ERRORS))
    app.include_router(report_routes.router)
    app.include_router(session_data.router)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the vote route, which FastAPI does not route (see votes)."""
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=[*app.routes, *votes.openapi_router.routes])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/healthz", responses={503: {"description": "Degraded: the same report, with "
                                                           "`problems`.",
                                           "content": {"application/json": {}}}})
    async def healthz(request: Request) -> JSONResponse:
        gw = gateway_state(request)
        report: dict[str, Any] = {}
        problems: list[str] = []
        try:
            report["redis"] = bool(await gw.redis.ping())
        except Exception as error:  # noqa: BLE001
            report["redis"] = False
            problems.append(f"redis: {error}")
        replicas = await gw.pool.health()
        report["vllm"] = replicas
        merged = await gw.versions.merged()  # the current version on merged weights, if so
        report["merged"] = None if merged is None else {"version": merged.version,
                                                        "url": merged.url}
        if not any(replicas.values()):
            problems.append("vllm: no replica answers /health")
        report["worker"] = gw.worker_ok
        if not gw.worker_ok:
            problems.append("worker: no Celery worker answered a ping")
        report["feedback"] = await _feedback_figures(gw)
        report["status"] = "ok" if not problems else "degraded"
        report["problems"] = problems
        return JSONResponse(report, status_code=200 if not problems else 503)

    @app.get("/metrics", response_class=PlainTextResponse)  # Prometheus' text format
    async def metrics(request: Request) -> Response:
        gw = gateway_state(request)
        if settings.metrics_token is not None and not bearer_matches(
                request.headers.get("authorization", ""),
                settings.metrics_token.get_secret_value()):
            return error_response(401, "/metrics needs 'Authorization: Bearer <token>' "
                                       "(ARENA_METRICS_TOKEN of this deployment).",
                                  "invalid_metrics_token", None, {"WWW-Authenticate": "Bearer"})
        for figure, value in (await _feedback_figures(gw)).items():
            if isinstance(value, int | float):
                gw.metrics.feedback.labels(figure).set(value)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _feedback_figures(gw: GatewayState) -> dict[str, Any]:
    try:
        figures = await stream_figures(gw.redis)
        figures["votes_since_learner_run"] = int(await gw.redis.get(VOTES_WAITING_KEY) or 0)
        return figures
    except Exception as error:  # noqa: BLE001 - figures are informative, never fatal
        return {"error": str(error)}


async def _watch_worker(gw: GatewayState) -> None:
    """Ping the Celery worker in the background (a ping takes up to a second; never on the
    request path) and keep the answer for /healthz."""
    celery = make_celery(gw.settings)
    while True:
        try:
            replies = await asyncio.to_thread(celery.control.ping, timeout=1.0)
            gw.worker_ok = bool(replies)
        except Exception:  # noqa: BLE001
            gw.worker_ok = False
        await asyncio.sleep(gw.settings.worker_check_interval_s)
