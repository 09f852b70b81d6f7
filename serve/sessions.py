"""The `arena_session` cookie: a signed random id given on first contact, so votes can be
accepted only from the session that created the battle. Clients that keep cookies (browsers,
httpx.Client) need nothing else. A pure ASGI middleware: it does not buffer streams."""

from __future__ import annotations

import uuid

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "arena_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
VERIFIED_CACHE_SIZE = 65536  # valid tokens whose signature was checked (the answer never changes)
# Our tokens are ~70 characters (a uuid hex, signed); anything longer is not one of ours.
MAX_TOKEN_CHARS = 128


class SessionMiddleware:
    def __init__(self, app: ASGIApp, secret: str) -> None:
        if not secret.strip():
            raise ValueError("the session secret is empty: anyone could sign a session cookie")
        self.app = app
        self.signer = URLSafeSerializer(secret, salt="arena-session")
        self._verified: dict[str, str] = {}

    def _verify(self, token: str) -> str | None:
        """The session a token names, if we signed it. Only tokens we issued are cached:
        invalid ones cost a sender nothing to make up, and would push out real sessions."""
        if (session := self._verified.get(token)) is not None:
            return session
        if len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            session = str(self.signer.loads(token))
        except BadSignature:
            return None
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = session
        return session

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
        scope.setdefault("state", {}).update(session=session, new_session=True)

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                token = self.signer.dumps(session)
                header = (f"{COOKIE_NAME}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; "
                          "HttpOnly; SameSite=Lax")
                message["headers"] = [*message.get("headers", []),
                                      (b"set-cookie", header.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)
