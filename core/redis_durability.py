"""Is this Redis safe to accept votes on? The gateway answers 2xx once a vote is in Redis, so
Redis must keep it until the archiver has it: an append-only file (a restart replays it) and
no eviction (under memory pressure an evicting policy deletes keys, stream entries among
them). The Redis the launcher runs itself is started so (arena/redis_server.py); one given
in ARENA_REDIS_URL is checked at the gateway's start, and refused unless
ARENA_ALLOW_VOLATILE_REDIS says to start anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from core.text import as_str

SAFE_EVICTION = "noeviction"
FSYNC_LOSS = {"everysec": "up to a second", "no": "up to ~30 s (the kernel's flush)"}
OVERRIDE = "ARENA_ALLOW_VOLATILE_REDIS=true"


class VolatileRedis(RuntimeError):
    """The Redis can lose votes the gateway would answer 2xx for."""


@dataclass
class Durability:
    problems: list[str] = field(default_factory=list)  # can lose accepted votes: refuse
    warnings: list[str] = field(default_factory=list)  # loses them only if the machine dies


def check_durability(client: redis.Redis) -> Durability:
    """Read appendonly, appendfsync and maxmemory-policy (CONFIG GET) and judge them. A
    Redis that refuses CONFIG (managed services often do) cannot be judged: a problem."""
    try:
        with client.pipeline(transaction=False) as pipe:
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                pipe.config_get(name)
            config = {as_str(k): as_str(v) for reply in pipe.execute() for k, v in reply.items()}
    except redis.ResponseError as error:
        return Durability(problems=[
            f"CONFIG GET was refused ({error}), so its persistence and eviction settings "
            "cannot be checked; make sure it runs with appendonly yes and maxmemory-policy "
            "noeviction"])
    result = Durability()
    if config.get("appendonly") != "yes":
        result.problems.append(
            f"appendonly is {config.get('appendonly')!r}: without the append-only file a "
            "restart loses every vote written since the last snapshot (CONFIG SET appendonly "
            "yes, and put it in redis.conf)")
    policy = config.get("maxmemory-policy")
    if policy != SAFE_EVICTION:
        result.problems.append(
            f"maxmemory-policy is {policy!r}: at maxmemory Redis deletes keys, votes not yet "
            f"archived among them (use {SAFE_EVICTION}: a full Redis refuses writes, and the "
            "gateway answers 503 instead of losing a vote)")
    fsync = config.get("appendfsync")
    if config.get("appendonly") == "yes" and fsync in FSYNC_LOSS:
        result.warnings.append(
            f"appendfsync is {fsync!r}: a crash of the machine (not of Redis) loses "
            f"{FSYNC_LOSS[fsync]} of accepted votes (always loses none)")
    return result


def require_durable(client: redis.Redis, url: str, allow_volatile: bool) -> list[str]:
    """Raise VolatileRedis, naming each problem, unless `allow_volatile`; returns what to
    log as warnings (the problems too, when allowed)."""
    result = check_durability(client)
    if result.problems and not allow_volatile:
        listed = "\n".join(f"  - {problem}" for problem in result.problems)
        raise VolatileRedis(
            f"refusing to start: the Redis at {url} can lose votes after answering 2xx:\n"
            f"{listed}\nFix its configuration, or set {OVERRIDE} to accept the risk "
            "(tests, throw-away setups).")
    return result.problems + result.warnings
