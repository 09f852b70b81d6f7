"""How the gateway reads JSON request bodies: strictly, with one parser for every route.

Python's `json` accepts what JSON does not (NaN, Infinity, lone UTF-16 surrogates such as
"\\ud800") and recurses once per nesting level (3,000 `[` raise RecursionError). Those values
then fail far from the input: a model server request that cannot be encoded, a 500. The
parser of pydantic-core (jiter) refuses them all with a position, so a bad body is a 422 like
any other malformed one. Bodies past `max_body_bytes` get 413 before anything parses them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import error_response


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than {max_bytes} bytes (the "
                              "gateway's max_body_bytes); send less.")


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once when its Content-Length says so, else as
    soon as that much has arrived (a chunked body). Starlette's RequestBodyLimitMiddleware
    does the same but answers in plain text, not in OpenAI's error format."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            await error_response(413, error.detail, "body_too_large")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)  # FastAPI passes HTTPExceptions on
            return message

        await self.app(scope, limited_receive, send)


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`; ValueError (with line and column) if it is not strict JSON."""
    return from_json(body, allow_inf_nan=False)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = parse_json(body)
            except ValueError as error:
                # FastAPI turns a JSONDecodeError into its usual 422 validation error.
                raise json.JSONDecodeError(str(error), body.decode(errors="replace"), 0) \
                    from error
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose endpoint reads its body with `parse_json` (FastAPI's documented way
    to change how a route reads requests: a custom Request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
