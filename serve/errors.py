"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}} with the right
HTTP status, so the official `openai` client raises its matching exception class."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error",
}


ERROR_DESCRIPTIONS = {
    400: "Refused by this deployment's settings (caps, context length, content type).",
    401: "The admin token is missing or wrong.",
    403: "Not this session's battle.",
    404: "No such model, version or battle.",
    409: "Not allowed in the current state (e.g. a second vote).",
    413: "The request body is over the size limit.",
    422: "The body is not strict JSON or not this route's schema.",
    429: "Rate limit exceeded; see Retry-After.",
    502: "The model server failed.",
    503: "A store or the model server is unavailable; see Retry-After.",
    504: "The model server or the answer took too long.",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, as every error of the gateway is answered."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these statuses documented with OpenAI's error body."""
    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]}
            for status in statuses}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status,
                        headers=headers)


UNKNOWN_FIELD = "unknown field; this route takes only its documented fields"
# Why a route refuses fields that other routes take, by path prefix.
UNKNOWN_FIELD_WHY = {
    "/v1/battles": "not taken by battles: both sides sample with the server's settings and a "
                   "random seed, so that no side can be identified before the vote; remove it",
}


def _describe_validation(error: RequestValidationError,
                         path: str = "") -> tuple[str, str | None]:
    unknown_field = next((why for prefix, why in UNKNOWN_FIELD_WHY.items()
                          if path.startswith(prefix)), UNKNOWN_FIELD)
    parts, first_param = [], None
    for item in error.errors():
        if item.get("type") == "json_invalid":  # where the JSON broke is in its message
            parts.append(f"not JSON ({item.get('ctx', {}).get('error')})")
            continue
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        first_param = first_param or location or None
        message = unknown_field if item.get("type") == "extra_forbidden" else item.get("msg")
        parts.append(f"{location or 'body'}: {message}")
    return "Invalid request body: " + "; ".join(parts), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc, request.url.path)
        return error_response(422, message, "invalid_body", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "body_too_large" if exc.status_code == 413 else None  # serve/bodies.py
        return error_response(exc.status_code, str(exc.detail), code, None,
                              dict(exc.headers or {}))
