"""What the gateway's routes depend on (FastAPI dependencies): the process's state, resolved
once in the app's lifespan (serve/app.py), and the operator check."""

from __future__ import annotations

import logging

from fastapi import Request

from core.secrets import bearer_matches
from serve.errors import APIError
from serve.state import GatewayState

log = logging.getLogger("arena.deploy.admin")
ACTOR_HEADER = "x-arena-actor"
MAX_ACTOR_LEN = 64


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def require_admin(request: Request) -> str:
    """Check the bearer token; return who is acting (header, else admin@<ip>)."""
    header = request.headers.get("authorization", "")
    if not bearer_matches(header, gateway_state(request).admin_token):
        log.warning("refused operator call %s %s from %s: %s", request.method,
                    request.url.path, client_ip(request),
                    "no bearer token" if not header else "wrong token")
        raise APIError(401, "Operator calls need 'Authorization: Bearer <admin token>' (the "
                            "ARENA_ADMIN_TOKEN of this deployment); the token is missing or "
                            "wrong.", "invalid_admin_token",
                       headers={"WWW-Authenticate": "Bearer"})
    actor = request.headers.get(ACTOR_HEADER, "").strip()[:MAX_ACTOR_LEN]
    return actor or f"admin@{client_ip(request)}"
