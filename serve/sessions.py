"""The `arena_session` cookie: a signed random id given on first contact, so votes can be
accepted only from the session that created the battle. Clients that keep cookies (browsers,
httpx.Client) need nothing else. A pure ASGI middleware: it does not buffer streams."""

from __future__ import annotations

import uuid
from http.cookies import SimpleCookie

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "arena_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600


class SessionMiddleware:
    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.signer = URLSafeSerializer(secret, salt="arena-session")

    def _read(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookie = SimpleCookie()
                try:
                    cookie.load(value.decode("latin-1"))
                except Exception:  # noqa: BLE001 - a garbled cookie header = no session
                    return None
                if COOKIE_NAME in cookie:
                    try:
                        return str(self.signer.loads(cookie[COOKIE_NAME].value))
                    except BadSignature:
                        return None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session = self._read(scope)
        is_new = session is None
        if session is None:
            session = uuid.uuid4().hex
        scope.setdefault("state", {})["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if is_new and message["type"] == "http.response.start":
                token = self.signer.dumps(session)
                header = (f"{COOKIE_NAME}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; "
                          "HttpOnly; SameSite=Lax")
                message["headers"] = [*message.get("headers", []),
                                      (b"set-cookie", header.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)
