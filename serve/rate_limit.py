"""Per-session and per-IP rate limits in Redis (fixed one-minute windows shared by every
gateway process). Over the limit: 429 with Retry-After = seconds left in the window.

The address is the peer's, or the client a trusted proxy names (ARENA_TRUSTED_PROXIES,
serve/app.py); an IPv6 client is counted by its /64. A request without a session cookie is
counted against its address's cookieless session."""

from __future__ import annotations

import ipaddress
import time

import redis.asyncio as aioredis
from starlette.types import Scope

from serve.errors import APIError

WINDOW_S = 60
KEY_TTL_S = WINDOW_S * 2


def address_key(host: str) -> str:
    """The address a client is counted under: an IPv4 address as is, an IPv6 one by its /64
    (a subscriber's usual allocation, any address of which its hosts may take), an
    IPv4-mapped IPv6 address as its IPv4."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def rate_subjects(scope: Scope) -> tuple[tuple[str, ...], str]:
    """The sessions and the address a request is counted under. A request that came without
    a session cookie got a fresh session (serve/sessions.py): dropping the cookie would
    give a script a new per-session allowance each time, so such requests are counted
    against one shared session per address first, and against the new session too (a
    browser's first request uses up its own allowance like any other)."""
    client = scope.get("client")
    ip = address_key(client[0]) if client else "unknown"
    state = scope["state"]
    if state.get("new_session"):
        return (f"cookieless:{ip}", state["session"]), ip
    return (state["session"],), ip


def window_keys(action: str, session: str, ip: str) -> tuple[str, str, str]:
    """This window's counter keys for the session and the IP, and the Retry-After value
    (seconds left in the window)."""
    now = time.time()
    window = int(now // WINDOW_S)
    retry_after = str(max(1, int(WINDOW_S - now % WINDOW_S)))
    return (f"arena:rl:{action}:s:{session}:{window}", f"arena:rl:{action}:ip:{ip}:{window}",
            retry_after)


def rate_limit_error(action: str, limit: int, who: str, retry_after: str) -> APIError:
    return APIError(429, f"Rate limit for {action} exceeded: at most {limit} per minute per "
                         f"{who}. Retry in {retry_after}s.", "rate_limit_exceeded",
                    headers={"Retry-After": retry_after})


class RateLimiter:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def check(self, action: str, sessions: tuple[str, ...], ip: str,
                    per_session: int, per_ip: int) -> None:
        """Count one `action` for these sessions and the IP; raise 429 when any is over."""
        if per_session <= 0 and per_ip <= 0:
            return  # both limits off: no Redis round-trip
        keys = []
        for session in sessions:
            session_key, ip_key, retry_after = window_keys(action, session, ip)
            keys.append((session_key, per_session, "session"))
        keys.append((ip_key, per_ip, "IP address"))
        pipe = self.redis.pipeline(transaction=False)
        for key, _, _ in keys:
            pipe.incr(key)
            pipe.expire(key, KEY_TTL_S)
        counts = (await pipe.execute())[0::2]
        for (_, limit, who), count in zip(keys, counts, strict=True):
            if limit > 0 and count > limit:
                raise rate_limit_error(action, limit, who, retry_after)
