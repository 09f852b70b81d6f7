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

from arena.redis_durability import require_durable
from arena.secrets import bearer_matches, session_secret
from arena.settings import Settings
from deploy.hot_swap import replica_sync_loop
from deploy.registry import Registry
from feedback.vote_stream import VoteAcceptor
from serve import battles, chat, pages, votes
from serve.bodies import BodySizeLimit
from serve.errors import error_response, error_responses, install_error_handlers
from serve.metrics import GatewayMetrics
from serve.rate_limit import RateLimiter
from serve.recent_errors import ErrorRing, RecordErrors
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
            Registry(sync_client, settings.data_dir / "audit.log").ensure_base()
        finally:
            sync_client.close()
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
    _include_optional_routers(app)

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
        gw: GatewayState = request.app.state.gateway
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
        gw: GatewayState = request.app.state.gateway
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


# The errors each optional router documents (OpenAI's body): the operator API's are listed
# in deploy/admin_routes.py.
OPTIONAL_ROUTERS = {"serve.leaderboard": (), "deploy.admin_routes": (400, 401, 404, 409, 422, 503),
                    "serve.report_routes": (), "serve.session_data": ()}


def _include_optional_routers(app: FastAPI) -> None:
    """Routers of packages that plug into the gateway (leaderboard, operator API, report)."""
    for module_name, errors in OPTIONAL_ROUTERS.items():
        try:
            module = __import__(module_name, fromlist=["router"])
        except ImportError as error:
            if error.name != module_name:
                raise
            continue
        app.include_router(module.router, responses=error_responses(*errors))


async def _feedback_figures(gw: GatewayState) -> dict[str, Any]:
    try:
        from feedback.stats import stream_figures
    except ImportError:
        return {}
    try:
        return await stream_figures(gw.redis)
    except Exception as error:  # noqa: BLE001 - figures are informative, never fatal
        return {"error": str(error)}


async def _watch_worker(gw: GatewayState) -> None:
    """Ping the Celery worker in the background (a ping takes up to a second; never on the
    request path) and keep the answer for /healthz."""
    from learner.celery_app import make_celery

    celery = make_celery(gw.settings)
    while True:
        try:
            replies = await asyncio.to_thread(celery.control.ping, timeout=1.0)
            gw.worker_ok = bool(replies)
        except Exception:  # noqa: BLE001
            gw.worker_ok = False
        await asyncio.sleep(gw.settings.worker_check_interval_s)
