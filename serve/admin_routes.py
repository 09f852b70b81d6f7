"""The operator API of the gateway.

Every call needs `Authorization: Bearer <admin token>`; errors are in OpenAI's format:
401 (no or wrong token), 404 (unknown version), 409 (transition not allowed), 400 (refused
checkpoint), 403 (a path outside the import roots, ARENA_IMPORT_ROOTS), 503 (a replica could
not load the version; `current` unchanged).

    GET  /admin/versions                  every version record, and the current one
    GET  /admin/versions/{id}             one record
    POST /admin/versions {"path": DIR}    register an adapter folder as a candidate
    POST /admin/versions/{id}/promote     load everywhere, then make it current
    POST /admin/rollback                  the previous current comes back
    POST /admin/versions/{id}/retire      out of serving and battles (files stay)

    GET  /admin/learner                   the loop: running iteration (phase, step, total,
                                          metrics), pause flags, votes waiting, pending
                                          candidates, decisions
    POST /admin/learner/start             start an iteration now (409 if one runs, learning is
                                          paused or a candidate waits for its decision)
    POST /admin/learner/pause | resume    no new learner iteration starts / they start again
    POST /admin/learner/cancel            stop the running iteration (409 if none runs)
    POST /admin/auto-promote/pause | resume   the loop decides nothing / decides again
    GET  /admin/voters                    the sessions with the highest anomaly scores
    GET  /admin/errors                    this gateway process's newest error answers

An optional `X-Arena-Actor` header names who acted, for the records and the audit log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import redis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from deploy import store
from deploy.adapter_check import AdapterRefused
from deploy.decision import auto_promote_paused, set_auto_promote_paused
from deploy.registry import Registry, UnknownVersion, VersionRecord
from deploy.states import TransitionError
from feedback.voter_scores import top_voters
from learner.trigger import (
    cancel_iteration,
    is_paused,
    learner_status,
    set_paused,
    start_iteration,
)
from serve import replicas
from serve.deps import gateway_state, require_admin
from serve.errors import APIError
from serve.recent_errors import RING_SIZE

log = logging.getLogger("arena.deploy.admin")
ERRORS = (400, 401, 404, 409, 422, 503)  # the error answers its routes document


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def registry_of(request: Request) -> Registry:
    return gateway_state(request).registry


class RegisterRequest(BaseModel):
    path: str = Field(min_length=1, description="A peft save_pretrained folder on this host, "
                                                "inside an import root (ARENA_IMPORT_ROOTS).")
    kind: Literal["policy", "reward"] = "policy"
    parent: str | None = None
    metrics: dict[str, Any] | None = None


def _record(record: VersionRecord, current: str) -> dict[str, Any]:
    return {**asdict(record), "object": "version", "is_current": record.id == current}


async def _call(coro: Any) -> Any:
    """Map registry and swap errors to OpenAI-format answers."""
    try:
        return await coro
    except UnknownVersion as error:
        raise APIError(404, f"No version named '{error.version}'.", "version_not_found",
                       "id") from error
    except TransitionError as error:
        raise APIError(409, str(error), "invalid_transition") from error
    except replicas.LoadFailed as error:
        raise APIError(503, f"{error}; `current` was not changed.", "adapter_load_failed",
                       headers={"Retry-After": "5"}) from error


@router.get("/versions")
async def list_versions(request: Request) -> dict[str, Any]:
    registry = registry_of(request)
    records, current = await asyncio.gather(asyncio.to_thread(registry.all),
                                            asyncio.to_thread(registry.current))
    return {"object": "list", "current": current, "data": [_record(r, current) for r in records]}


@router.get("/versions/{version}")
async def get_version(version: str, request: Request) -> dict[str, Any]:
    registry = registry_of(request)
    record = await _call(asyncio.to_thread(registry.get, version))
    return _record(record, await asyncio.to_thread(registry.current))


@router.post("/versions", status_code=201)
async def register_version(body: RegisterRequest, request: Request,
                           actor: str = Depends(require_admin)) -> JSONResponse:
    """Check and copy the folder into the store, load it into the replicas (a replica that
    refuses it refuses the registration), then record it as a candidate."""
    gw, registry = gateway_state(request), registry_of(request)
    try:
        staged = await asyncio.to_thread(store.stage, gw.settings, registry, body.path,
                                         body.kind, body.parent, body.metrics)
    except AdapterRefused as error:
        log.warning("refused checkpoint %s (%s): %s", body.path, error.code, error)
        status = 403 if error.code == "path_not_allowed" else 400
        raise APIError(status, f"Checkpoint {body.path} refused: {error}", error.code,
                       "path") from error
    loaded: list[str] = []
    if staged.kind == "policy":
        record = VersionRecord(id=staged.id, kind="policy", state="candidate",
                               path=str(staged.path), files=staged.manifest.files)
        try:
            loaded = await replicas.load_everywhere(gw.pool, record, require_one=False)
        except replicas.LoadFailed as error:
            await gw.pool.unload_everywhere(staged.id)
            store.discard(staged)
            raise APIError(400, f"Checkpoint refused by the model server: {error}",
                           "checkpoint_incompatible", "path") from error
    record = await asyncio.to_thread(store.commit, registry, staged, actor)
    body_out = _record(record, await asyncio.to_thread(registry.current))
    return JSONResponse({**body_out, "loaded_on": loaded}, status_code=201)


@router.post("/versions/{version}/promote")
async def promote_version(version: str, request: Request,
                          actor: str = Depends(require_admin)) -> dict[str, Any]:
    result = await _call(replicas.promote(gateway_state(request).pool, registry_of(request),
                                          version, actor))
    return result.to_dict()


@router.post("/rollback")
async def rollback(request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    result = await _call(replicas.rollback(gateway_state(request).pool, registry_of(request),
                                           actor))
    return result.to_dict()


@router.post("/versions/{version}/retire")
async def retire_version(version: str, request: Request,
                         actor: str = Depends(require_admin)) -> dict[str, Any]:
    result = await _call(replicas.retire(gateway_state(request).pool, registry_of(request),
                                         version, actor))
    return result.to_dict()


# --- the loop: learner and auto-promotion controls ----------------------------------------
async def _learner_status(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(learner_status, gateway_state(request).settings)


@router.get("/learner")
async def learner_state(request: Request) -> dict[str, Any]:
    return await _learner_status(request)


@router.post("/learner/{action}")
async def learner_control(action: Literal["start", "pause", "resume", "cancel"],
                          request: Request, actor: str = Depends(require_admin)
                          ) -> dict[str, Any]:
    registry = registry_of(request)
    if action == "start":
        started = await asyncio.to_thread(start_iteration, gateway_state(request).settings,
                                          reason=f"started by {actor}")
        if not started["started"]:
            raise APIError(409, started["message"], "not_started")
        registry.audit("learner-start", None, actor=actor, before="idle",
                       after=f"task={started['task_id']}")
        return {**await _learner_status(request), "start": started}
    if action == "cancel":
        result = await asyncio.to_thread(cancel_iteration, gateway_state(request).settings)
        if result["cancelled"] is None:
            raise APIError(409, "No learner iteration is running.", "not_running")
        registry.audit("cancel", None, actor=actor, before=f"task={result['cancelled']}",
                       after=result["state"])
        return {**await _learner_status(request), "cancel": result}
    await _pause_or_resume(registry, actor, "learner", action, is_paused, set_paused)
    return await _learner_status(request)


@router.post("/auto-promote/{action}")
async def auto_promote_control(action: Literal["pause", "resume"], request: Request,
                               actor: str = Depends(require_admin)) -> dict[str, Any]:
    await _pause_or_resume(registry_of(request), actor, "auto-promote", action,
                           auto_promote_paused, set_auto_promote_paused)
    return await _learner_status(request)


async def _pause_or_resume(registry: Registry, actor: str, what: str, action: str,
                           read: Callable[[redis.Redis], bool],
                           write: Callable[[redis.Redis, bool], None]) -> None:
    """Set a pause flag (the learner's, the loop's decisions') and audit the change."""
    before = await asyncio.to_thread(read, registry.redis)
    await asyncio.to_thread(write, registry.redis, action == "pause")
    registry.audit(f"{what}-{action}", None, actor=actor, before=f"paused={before}",
                   after=f"paused={action == 'pause'}")


@router.get("/voters")
async def list_voters(request: Request, limit: int = Query(100, ge=1, le=10_000)
                      ) -> dict[str, Any]:
    """The sessions with the highest anomaly scores (feedback/voter_anomaly.py), flagged or
    not, with what the score is made of, and what the ratings and the learner do with the
    flagged sessions' votes (settings `flagged_votes`)."""
    gw = gateway_state(request)
    return {"object": "list", "data": await top_voters(gw.redis, limit),
            "flagged_votes": gw.settings.flagged_votes,
            "flagged_vote_weight": gw.settings.flagged_vote_weight}


@router.get("/errors")
async def recent_errors(request: Request, limit: int = Query(100, ge=1, le=RING_SIZE)
                        ) -> dict[str, Any]:
    """This gateway process's newest error answers (status >= 400), newest first
    (serve/recent_errors.py): time, method, path, status, code and message."""
    return {"object": "list", "data": request.app.state.recent_errors.newest(limit)}
