"""OpenAI-compatible routes: GET /v1/models and POST /v1/chat/completions (streaming and
not), passed through to vLLM with `model` resolved to a concrete version."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from core.settings import Settings
from deploy.registry import CURRENT_ALIAS
from feedback.vote_stream import CHATS_STREAM
from serve.bodies import StrictJSONRoute
from serve.deps import gateway_state
from serve.errors import APIError, error_body, error_response, error_responses
from serve.rate_limit import rate_subjects
from serve.state import GatewayState

log = logging.getLogger("arena.gateway")
router = APIRouter(route_class=StrictJSONRoute)
SSE_MEDIA_TYPE = "text/event-stream"
# One server-sent event (before OpenAPI 3.2 an event stream's `schema` describes each event):
# its `data` line(s), and the `event` name where the route sends one (battles: a, b, done).
SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"],
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                   "id": {"type": "string"}, "retry": {"type": "integer"}}}
# The errors a route that calls the model server can answer (serve/upstream.py).
UPSTREAM_ERRORS = (400, 404, 413, 422, 429, 502, 503, 504)


def answer_responses(description: str, model: type[BaseModel] | None = None) -> dict[int, Any]:
    """`responses=` of a route that answers JSON, or an SSE stream with `stream: true`."""
    ok: dict[str, Any] = {"description": description,
                          "content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}}}
    if model is not None:
        ok["model"] = model
    return {200: ok, **error_responses(*UPSTREAM_ERRORS)}


class ContentPart(BaseModel):
    """One part of a message's content in OpenAI's list form. Only `text` parts are read;
    other types (images, audio) pass the schema so the answer can say what to send instead."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]
    name: str | None = Field(None, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"]


StopSequence = Annotated[str, Field(min_length=1, max_length=256)]


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request as far as this gateway forwards it to vLLM: these fields are
    the allow-list (any other is refused, 422), each bounded. `max_tokens` is also checked
    against the context length (400)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, examples=["current"])
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's range (int64)
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=4)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens


def text_messages(messages: list[ChatMessage], settings: Settings) -> list[dict[str, str]]:
    """The messages as forwarded and archived: content always a string (OpenAI's text parts
    joined by newlines, as vLLM joins them); 400 for other parts and beyond the caps."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content.{j}: a part of type "
                                        f"{part.type!r}; this model reads text only: send "
                                        '{"type": "text", "text": "..."} parts or a string.',
                                   "unsupported_content", f"messages.{i}.content.{j}")
            content = "\n".join(part.text for part in content)  # type: ignore[misc]
        out.append({**message.model_dump(exclude_none=True), "content": content})
    check_caps(out, settings)
    return out


def check_caps(messages: list[dict[str, str]], settings: Settings, sent_from: int = 0) -> None:
    """The deployment's caps on a conversation (settings `max_messages`,
    `max_message_chars`): 400 beyond them. The length is checked from `sent_from` on, the
    messages this request sent (a battle's earlier turns include the models' answers)."""
    if len(messages) > settings.max_messages:
        raise APIError(400, f"At most {settings.max_messages} messages per conversation, got "
                            f"{len(messages)}; drop early turns.", "too_many_messages",
                       "messages")
    for i, message in enumerate(messages[sent_from:], start=sent_from):
        if len(message["content"]) > settings.max_message_chars:
            raise APIError(400, f"messages.{i}.content has {len(message['content'])} "
                                f"characters; at most {settings.max_message_chars} per message.",
                           "message_too_long", f"messages.{i}.content")


def check_max_tokens(body: ChatCompletionRequest, settings: Settings) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > settings.vllm_max_model_len:
            raise APIError(400, f"{name} is {value}; this model's context is "
                                f"{settings.vllm_max_model_len} tokens, prompt included: ask "
                                "for fewer.", "max_tokens_too_large", name)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gw = gateway_state(request)
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


@dataclass(frozen=True)
class ChatTurn:
    session: str
    version: str
    messages: list[dict[str, str]]


def archive_turn(gw: GatewayState, turn: ChatTurn) -> None:
    """Keep the prompt for the learner (arena:chats), once its answer was given: a request
    that failed (a prompt too long, a model server error) leaves nothing behind."""
    if gw.settings.archive_chats:
        gw.background(gw.redis.xadd(CHATS_STREAM, {
            "session": turn.session, "model": turn.version, "ts": str(time.time()),
            "messages": json.dumps(turn.messages, ensure_ascii=False)},
            maxlen=gw.settings.chats_stream_maxlen, approximate=True))


def deadline_error(settings: Settings) -> APIError:
    return APIError(504, f"The answer took longer than answer_deadline_s = "
                         f"{settings.answer_deadline_s:g} s; ask for fewer tokens.",
                    "answer_deadline")


class DeadlineStreamingResponse(StreamingResponse):
    """A stream with a total deadline (event-loop time). The per-read timeout of the model
    server does not bound a client that stops reading: the send to it then waits forever,
    holding an upstream connection. Past the deadline the connection to the client is
    dropped and the body iterator closed, which closes the upstream answer (vLLM aborts)."""

    def __init__(self, content: AsyncIterator[Any], deadline: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout_at(self.deadline):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            log.warning("a streamed answer passed its deadline; cut off")
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


@router.post("/v1/chat/completions", responses=answer_responses(
    "OpenAI's chat completion (JSON), or its chunks as server-sent events with `stream: true`."))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    gw = gateway_state(request)
    session = request.scope["state"]["session"]
    await gw.limiter.check("chat", *rate_subjects(request.scope),
                           gw.settings.rate_chat_per_session, gw.settings.rate_chat_per_ip)
    messages = text_messages(body.messages, gw.settings)
    check_max_tokens(body, gw.settings)
    record = await gw.versions.resolve(body.model)
    payload = {**body.model_dump(exclude_none=True), "model": record.id, "messages": messages}
    turn = ChatTurn(session, record.id, messages)
    deadline = asyncio.get_running_loop().time() + gw.settings.answer_deadline_s
    started = time.perf_counter()
    gw.metrics.requests.labels("chat", record.id).inc()
    if body.stream:
        return await _stream(gw, payload, turn, record.path, started, deadline)
    try:
        async with asyncio.timeout_at(deadline):
            upstream = await gw.pool.post("/v1/chat/completions", payload, record.id,
                                          record.path)
    except TimeoutError as error:
        raise deadline_error(gw.settings) from error
    gw.metrics.latency.labels("chat", record.id).observe(time.perf_counter() - started)
    if upstream.status_code != 200:
        gw.metrics.errors.labels("chat", str(upstream.status_code)).inc()
        return upstream_error(upstream.status_code, upstream.content)
    archive_turn(gw, turn)
    try:
        usage = json.loads(upstream.content).get("usage") or {}
        gw.metrics.tokens.labels("chat", record.id).inc(usage.get("completion_tokens", 0))
    except ValueError:
        pass
    return Response(upstream.content, media_type="application/json")


async def _stream(gw: GatewayState, payload: dict, turn: ChatTurn, adapter: str | None,
                  started: float, deadline: float) -> Response:
    version = turn.version
    stack = AsyncExitStack()
    try:
        async with asyncio.timeout_at(deadline):
            upstream = await stack.enter_async_context(
                gw.pool.stream("/v1/chat/completions", payload, version, adapter))
    except TimeoutError as error:
        await stack.aclose()
        raise deadline_error(gw.settings) from error
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
            archive_turn(gw, turn)  # only a stream relayed to its end
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
            gw.metrics.tokens.labels("chat", version).inc(chunks)
            gw.metrics.latency.labels("chat", version).observe(time.perf_counter() - started)

    return DeadlineStreamingResponse(
        relay(), deadline, media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
