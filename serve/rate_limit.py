"""Per-session and per-IP rate limits in Redis (fixed one-minute windows shared by every
gateway process). Over the limit: 429 with Retry-After = seconds left in the window."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from serve.errors import APIError

WINDOW_S = 60
KEY_TTL_S = WINDOW_S * 2


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

    async def check(self, action: str, session: str, ip: str,
                    per_session: int, per_ip: int) -> None:
        """Count one `action` for this session and IP; raise 429 when either is over."""
        if per_session <= 0 and per_ip <= 0:
            return  # both limits off: no Redis round-trip
        session_key, ip_key, retry_after = window_keys(action, session, ip)
        keys = [(session_key, per_session, "session"), (ip_key, per_ip, "IP address")]
        pipe = self.redis.pipeline(transaction=False)
        for key, _, _ in keys:
            pipe.incr(key)
            pipe.expire(key, KEY_TTL_S)
        counts = (await pipe.execute())[0::2]
        for (_, limit, who), count in zip(keys, counts, strict=True):
            if limit > 0 and count > limit:
                raise rate_limit_error(action, limit, who, retry_after)
