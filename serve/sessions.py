"""The `arena_session` cookie: a signed random id given on first contact, so votes can be
accepted only from the session that created the battle. Clients that keep cookies (browsers,
httpx.Client) need nothing else. A pure ASGI middleware: it does not buffer streams."""

from __future__ import annotations

import uuid
from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "arena_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
VERIFIED_CACHE_SIZE = 65536  # tokens whose signature was checked (a token's answer never changes)


class SessionMiddleware:
    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.signer = URLSafeSerializer(secret, salt="arena-session")
        self._verify = lru_cache(maxsize=VERIFIED_CACHE_SIZE)(self._verify_token)

    def _verify_token(self, token: str) -> str | None:
        try:
            return str(self.signer.loads(token))
        except BadSignature:
            return None

    def _read(self, scope: Scope) -> str | None:
        """The session in the `arena_session` cookie, if its signature is ours. Cookie
        headers are `name=value` pairs separated by `;` (RFC 6265); our token needs no
        quoting, so a split is enough (http.cookies is 10x slower and this runs per request)."""
        for name, value in scope.get("headers", ()):
            if name != b"cookie":
                continue
            for pair in value.decode("latin-1").split(";"):
                key, _, token = pair.strip().partition("=")
                if key == COOKIE_NAME:
                    return self._verify(token.strip('"'))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session = self._read(scope)
        if session is not None:
            scope.setdefault("state", {})["session"] = session
            await self.app(scope, receive, send)
            return
        session = uuid.uuid4().hex  # first contact: a new session, its cookie on the answer
        scope.setdefault("state", {})["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                token = self.signer.dumps(session)
                header = (f"{COOKIE_NAME}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; "
                          "HttpOnly; SameSite=Lax")
                message["headers"] = [*message.get("headers", []),
                                      (b"set-cookie", header.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)
