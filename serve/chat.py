"""OpenAI-compatible routes: GET /v1/models and POST /v1/chat/completions (streaming and
not), passed through to vLLM with `model` resolved to a concrete version."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from deploy.registry import CURRENT_ALIAS
from feedback.vote_stream import CHATS_STREAM
from serve.errors import error_body, error_response
from serve.state import GatewayState

router = APIRouter()
SSE_MEDIA_TYPE = "text/event-stream"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields we look at; every other OpenAI field passes through to vLLM unchanged."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gw = state_of(request)
    current = await gw.versions.current()
    data = []
    for record in await gw.versions.live():
        data.append({"id": record.id, "object": "model", "created": int(record.created_at),
                     "owned_by": "rlhf-arena", "state": record.state, "parent": record.parent})
    data.append({"id": CURRENT_ALIAS, "object": "model", "created": int(time.time()),
                 "owned_by": "rlhf-arena", "state": "alias", "parent": current,
                 "alias_of": current})
    return {"object": "list", "data": data}


def upstream_message(status: int, content: bytes) -> str:
    """The message of one of vLLM's own errors (e.g. prompt longer than the context)."""
    try:
        body = json.loads(content)
        message = body["error"]["message"] if "error" in body else body.get("message", "")
    except (ValueError, KeyError, TypeError):
        message = content.decode(errors="replace")[:500]
    if status == 400 and "context length" in message:
        message = f"Prompt too long for this model: {message}"
    return message or "upstream error"


def upstream_error(status: int, content: bytes) -> Response:
    """vLLM's errors keep their status, in OpenAI's format."""
    return error_response(status, upstream_message(status, content), "upstream_error")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    gw = state_of(request)
    session = request.scope["state"]["session"]
    await gw.limiter.check("chat", session, client_ip(request),
                           gw.settings.rate_chat_per_session, gw.settings.rate_chat_per_ip)
    record = await gw.versions.resolve(body.model)
    payload = body.model_dump(exclude_none=True)
    payload["model"] = record.id
    if gw.settings.archive_chats:
        gw.background(gw.redis.xadd(CHATS_STREAM, {
            "session": session, "model": record.id, "ts": str(time.time()),
            "messages": json.dumps(payload["messages"], ensure_ascii=False)},
            maxlen=gw.settings.chats_stream_maxlen, approximate=True))
    started = time.perf_counter()
    gw.metrics.requests.labels("chat", record.id).inc()
    if body.stream:
        return await _stream(gw, payload, record.id, record.path, started)
    upstream = await gw.pool.post("/v1/chat/completions", payload, record.id, record.path)
    gw.metrics.latency.labels("chat", record.id).observe(time.perf_counter() - started)
    if upstream.status_code != 200:
        gw.metrics.errors.labels("chat", str(upstream.status_code)).inc()
        return upstream_error(upstream.status_code, upstream.content)
    try:
        usage = json.loads(upstream.content).get("usage") or {}
        gw.metrics.tokens.labels(record.id).inc(usage.get("completion_tokens", 0))
    except ValueError:
        pass
    return Response(upstream.content, media_type="application/json")


async def _stream(gw: GatewayState, payload: dict, version: str, adapter: str | None,
                  started: float) -> Response:
    stack = AsyncExitStack()
    upstream = await stack.enter_async_context(
        gw.pool.stream("/v1/chat/completions", payload, version, adapter))
    if upstream.status_code != 200:
        content = await upstream.aread()
        await stack.aclose()
        gw.metrics.errors.labels("chat", str(upstream.status_code)).inc()
        return upstream_error(upstream.status_code, content)

    async def relay():
        chunks = 0
        try:
            async for raw in upstream.aiter_raw():
                chunks += raw.count(b"data: {")
                yield raw
        except httpx.HTTPError as error:
            # The model server died mid-answer: the status line is long sent, so say it in
            # the stream (OpenAI clients raise on an `error` event) and end it cleanly.
            gw.metrics.errors.labels("chat", "502").inc()
            body = error_body(502, f"The model server stopped mid-answer ({error!r}); retry.",
                              "upstream_interrupted")
            yield f"data: {json.dumps(body)}\n\n".encode()
        finally:
            # Runs on normal end and on client disconnect (the task is cancelled): closing
            # the upstream response makes vLLM abort the generation.
            await asyncio.shield(stack.aclose())
            gw.metrics.tokens.labels(version).inc(chunks)
            gw.metrics.latency.labels("chat", version).observe(time.perf_counter() - started)

    return StreamingResponse(relay(), media_type=SSE_MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
