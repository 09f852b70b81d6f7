"""The gateway's recent error answers, for the operator console (GET /admin/errors).

A plain ASGI middleware watches every answer; one with status >= 400 is kept in a bounded ring
of this process (time, method, path, status, and the OpenAI-style body's code and message).
Only error bodies are read, and only up to `MAX_BODY_BYTES`; the query string, headers and
request bodies are never kept. Errors sent inside a stream that started with 200 (an SSE
`error` event) are not answers with an error status and are not in the ring.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

RING_SIZE = 200  # newest error answers kept per gateway process
MAX_BODY_BYTES = 4096  # of an error body read for its code and message
MAX_MESSAGE_CHARS = 300


class ErrorRing:
    def __init__(self, size: int = RING_SIZE) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, entry: dict[str, Any]) -> None:
        self._items.append(entry)

    def newest(self, limit: int) -> list[dict[str, Any]]:
        return list(reversed(self._items))[:limit]


def describe(body: bytes) -> tuple[str | None, str]:
    """(code, message) of an OpenAI-style error body; the raw text if it is not one."""
    try:
        error = json.loads(body)["error"]
        return error.get("code"), str(error.get("message", ""))[:MAX_MESSAGE_CHARS]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, body.decode("utf-8", "replace")[:MAX_MESSAGE_CHARS]


class RecordErrors:
    def __init__(self, app: ASGIApp, ring: ErrorRing) -> None:
        self.app, self.ring = app, ring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                if len(body) < MAX_BODY_BYTES:
                    body.extend(message.get("body", b"")[:MAX_BODY_BYTES - len(body)])
                if not message.get("more_body", False):
                    code, text = describe(bytes(body))
                    self.ring.add({"ts": time.time(), "method": scope["method"],
                                   "path": scope["path"], "status": status, "code": code,
                                   "message": text})
            await send(message)

        await self.app(scope, receive, watch)
