"""Per-session and per-IP rate limits in Redis (fixed one-minute windows shared by every
gateway process). Over the limit: 429 with Retry-After = seconds left in the window."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from serve.errors import APIError

WINDOW_S = 60


class RateLimiter:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def check(self, action: str, session: str, ip: str,
                    per_session: int, per_ip: int) -> None:
        """Count one `action` for this session and IP; raise 429 when either is over."""
        if per_session <= 0 and per_ip <= 0:
            return  # both limits off: no Redis round-trip
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after = str(max(1, int(WINDOW_S - now % WINDOW_S)))
        keys = [(f"arena:rl:{action}:s:{session}:{window}", per_session, "session"),
                (f"arena:rl:{action}:ip:{ip}:{window}", per_ip, "IP address")]
        pipe = self.redis.pipeline(transaction=False)
        for key, _, _ in keys:
            pipe.incr(key)
            pipe.expire(key, WINDOW_S * 2)
        counts = (await pipe.execute())[0::2]
        for (_, limit, who), count in zip(keys, counts, strict=True):
            if limit > 0 and count > limit:
                raise APIError(429, f"Rate limit for {action} exceeded: at most {limit} per "
                                    f"minute per {who}. Retry in {retry_after}s.",
                               "rate_limit_exceeded", headers={"Retry-After": retry_after})
