"""A session's own data: `GET /v1/session/data` shows what the archive holds of this
session (its chat turns and votes), `DELETE /v1/session/data` erases them
(feedback/erasure.py says what that covers). The session is the signed cookie's: nobody can
read or erase another's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from feedback.archive import Archive
from feedback.erasure import ERASED_TTL_S, erased_key
from serve.deps import gateway_state
from serve.errors import APIError, error_responses
from serve.rate_limit import rate_subjects
from serve.state import GatewayState

router = APIRouter(tags=["privacy"], responses=error_responses(429, 503))
SHOWN_PER_KIND = 500  # the newest chat turns and votes shown; the counts cover all


def _archive(gw: GatewayState) -> Archive:
    if gw.archive is None:
        gw.archive = Archive(gw.settings.effective_archive_url)
    return gw.archive


async def _session(request: Request) -> tuple[GatewayState, str]:
    gw = gateway_state(request)
    settings = gw.settings
    await gw.limiter.check("session_data", *rate_subjects(request.scope),
                           settings.rate_chat_per_session, settings.rate_chat_per_ip)
    return gw, request.scope["state"]["session"]


async def _in_archive(gw: GatewayState, work: str, call: Any) -> Any:
    try:
        return await asyncio.to_thread(call, _archive(gw))
    except Exception as error:  # noqa: BLE001 - the database is down or refused
        raise APIError(503, f"The archive could not {work} ({type(error).__name__}); retry "
                            "shortly.", "archive_unavailable",
                       headers={"Retry-After": "5"}) from error


@router.get("/v1/session/data", summary="What the service keeps of this session")
async def show_session_data(request: Request) -> dict[str, Any]:
    gw, session = await _session(request)
    data = await _in_archive(gw, "be read",
                             lambda archive: archive.session_data(session, SHOWN_PER_KIND))
    return {"archive_chats": gw.settings.archive_chats, **data}


@router.delete("/v1/session/data", summary="Erase this session's chat turns and votes")
async def erase_session_data(request: Request) -> dict[str, Any]:
    gw, session = await _session(request)
    erased_at = time.time()
    # Mark first: what is still in a stream is dropped when it reaches the archiver.
    await gw.redis.set(erased_key(session), repr(erased_at), ex=ERASED_TTL_S)
    turns, voted = await _in_archive(
        gw, "erase", lambda archive: archive.delete_session(session, erased_at))
    return {"erased_chat_turns": turns, "erased_votes": voted, "erased_at": erased_at}
