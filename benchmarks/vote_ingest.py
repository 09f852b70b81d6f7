"""Vote ingest benchmark: how many votes per second the vote path takes, and how fast.

Starts a private redis-server (AOF, appendfsync always, as in production) in a temp dir and
measures, in one run:

  1. xadd      the baseline: raw `XADD` (`publish_vote`, redis.asyncio) from `--concurrency`
               concurrent writers, as many request handlers would; latency per XADD.
  2. drain     the archiver alone: a backlog of votes in the stream, one archiver process
               (`arena consumers archiver`) empties it into the archive.
  3. live      both at once: writers at full speed, the archiver following; latency is
               voted_at -> archived_at (stamped when its batch's transaction starts).
  4. http      POST /v1/battles/{id}/vote on the gateway (uvicorn, 1 and 2 workers) with
               the archiver running: the whole path a user's vote takes, end to end
               (votes/s until the last vote is archived; latency per HTTP request).

Every section counts both ends: votes written vs distinct votes archived, nothing pending,
nothing dead-lettered.

    .venv/bin/python benchmarks/vote_ingest.py --votes 20000
    .venv/bin/python benchmarks/vote_ingest.py --archive-url postgresql+psycopg2://...
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import redis
import redis.asyncio as aioredis
import uvloop
from itsdangerous import URLSafeSerializer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arena.redis_server import start_redis  # noqa: E402
from core.settings import Settings  # noqa: E402
from feedback.archive import Archive  # noqa: E402
from feedback.consumers import ARCHIVER  # noqa: E402
from feedback.vote_record import VoteRecord  # noqa: E402
from feedback.vote_stream import DEAD_LETTER_STREAM, VOTES_STREAM, publish_vote  # noqa: E402
from serve.battles import BATTLE_KEY, battle_fields  # noqa: E402
from serve.sessions import COOKIE_NAME  # noqa: E402
from testkit.net import free_port  # noqa: E402
from testkit.processes import stop_group  # noqa: E402
from testkit.synthetic_votes import synthetic_votes  # noqa: E402

console = Console(width=150)
CONTENT_LENGTH = re.compile(rb"(?i)content-length:\s*(\d+)")


@dataclasses.dataclass
class Result:
    section: str
    votes: int
    seconds: float
    latencies_s: np.ndarray
    sent: int
    arrived: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.votes / self.seconds if self.seconds else float("nan")

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s.size else 0.0




# --- the producer side -----------------------------------------------------------------------
async def publish_all(url: str, votes: Sequence[VoteRecord], concurrency: int) -> np.ndarray:
    """XADD every vote from `concurrency` concurrent writers, each stamping voted_at as it
    sends (as the gateway does); returns per-XADD latencies in seconds."""
    client = aioredis.Redis.from_url(url, max_connections=concurrency)
    latencies = np.empty(len(votes))
    queue = iter(range(len(votes)))

    async def writer() -> None:
        for i in queue:
            record = dataclasses.replace(votes[i], voted_at=time.time())
            started = time.perf_counter()
            await publish_vote(client, record)
            latencies[i] = time.perf_counter() - started

    try:
        await asyncio.gather(*(writer() for _ in range(concurrency)))
    finally:
        await client.aclose()
    return latencies


def publish_from_processes(url: str, votes: Sequence[VoteRecord], concurrency: int,
                           processes: int) -> np.ndarray:
    """`publish_all` split over `processes` writer processes (like gateway workers), each with
    its share of the concurrency; latencies in the order of `votes`."""
    if processes <= 1:
        return asyncio.run(publish_all(url, votes, concurrency))
    shares = [list(votes[i::processes]) for i in range(processes)]
    each = max(concurrency // processes, 1)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_noop, range(processes)))  # workers up before the clock matters
        parts = list(pool.map(_publish_share, [url] * processes, shares, [each] * processes))
    latencies = np.empty(len(votes))
    for i, part in enumerate(parts):
        latencies[i::processes] = part
    return latencies


def _noop(_: int) -> None:
    return None


def _publish_share(url: str, votes: list[VoteRecord], concurrency: int) -> np.ndarray:
    return asyncio.run(publish_all(url, votes, concurrency))


def bench_xadd(settings: Settings, votes: Sequence[VoteRecord], concurrency: int,
               processes: int) -> Result:
    client = redis.Redis.from_url(settings.effective_redis_url)
    client.delete(VOTES_STREAM)
    started = time.perf_counter()
    latencies = publish_from_processes(settings.effective_redis_url, votes, concurrency,
                                       processes)
    seconds = time.perf_counter() - started
    arrived = int(client.xlen(VOTES_STREAM))
    client.delete(VOTES_STREAM)
    return Result(f"xadd x{processes}", len(votes), seconds, latencies, len(votes), arrived,
                  f"{processes} process(es), {concurrency} concurrent writers")


# --- the consumer side -----------------------------------------------------------------------
def start_archiver(settings: Settings, log: Path) -> subprocess.Popen:
    """The archiver as its own process, configured like `arena consumers` (ARENA_* env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({
        "ARENA_REDIS_URL": settings.effective_redis_url,
        "ARENA_ARCHIVE_URL": settings.effective_archive_url,
        "ARENA_DATA_DIR": str(settings.data_dir),
        "ARENA_STREAM_BATCH_SIZE": str(settings.stream_batch_size),
        "ARENA_STREAM_BLOCK_MS": str(settings.stream_block_ms),
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
    })
    return subprocess.Popen([sys.executable, "-m", "arena.cli", "consumers", ARCHIVER], env=env,
                            cwd=settings.data_dir, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_archived(archive: Archive, n: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while archive.count() < n:
        if proc.poll() is not None:
            raise RuntimeError(f"archiver exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {archive.count()} of {n} archived in {timeout_s}s")
        time.sleep(0.02)


def check_ends(client: redis.Redis, archive: Archive, votes: Sequence[VoteRecord]) -> int:
    """Distinct archived votes among those sent; raises if anything is missing or stuck."""
    wanted = {vote.vote_id for vote in votes}
    stored = [s.record.vote_id for s in archive.iter_votes() if s.record.vote_id in wanted]
    pending = client.xpending(VOTES_STREAM, ARCHIVER)["pending"]
    dead = client.xlen(DEAD_LETTER_STREAM)
    if len(stored) != len(set(stored)) or set(stored) != wanted or pending or dead:
        raise RuntimeError(f"ends do not match: sent {len(wanted)}, archived {len(stored)} "
                           f"({len(set(stored))} distinct), pending {pending}, dead {dead}")
    return len(set(stored))


def bench_drain(settings: Settings, votes: Sequence[VoteRecord], concurrency: int,
                processes: int, log: Path) -> Result:
    client = redis.Redis.from_url(settings.effective_redis_url)
    publish_from_processes(settings.effective_redis_url, votes, concurrency, processes)
    archive = Archive(settings.effective_archive_url)
    before = archive.count()
    proc = start_archiver(settings, log)
    try:
        # Start the clock at the first stored vote: process start-up is not ingest.
        wait_archived(archive, before + 1, proc, 60)
        started = time.perf_counter()
        first = archive.count()
        wait_archived(archive, before + len(votes), proc, 600)
        seconds = time.perf_counter() - started
    finally:
        stop_group(proc)
    arrived = check_ends(client, archive, votes)
    archive.close()
    return Result("drain", len(votes) - (first - before), seconds, np.empty(0), len(votes),
                  arrived, f"backlog -> archive, batch {settings.stream_batch_size} "
                  "(clock from the first stored batch)")


def bench_live(settings: Settings, votes: Sequence[VoteRecord], concurrency: int,
               processes: int, log: Path) -> Result:
    client = redis.Redis.from_url(settings.effective_redis_url)
    archive = Archive(settings.effective_archive_url)
    before = archive.count()
    proc = start_archiver(settings, log)
    try:
        time.sleep(2.0)  # let it start and block on the stream
        started = time.perf_counter()
        publish_from_processes(settings.effective_redis_url, votes, concurrency, processes)
        wait_archived(archive, before + len(votes), proc, 600)
        seconds = time.perf_counter() - started
    finally:
        stop_group(proc)
    arrived = check_ends(client, archive, votes)
    wanted = {vote.vote_id for vote in votes}
    latencies = np.array([s.archived_at - s.record.voted_at for s in archive.iter_votes()
                          if s.record.vote_id in wanted])
    archive.close()
    return Result(f"live x{processes}", len(votes), seconds, latencies, len(votes), arrived,
                  "voted_at -> archived_at, writers and archiver at once")


def session_of(i: int, sessions: int) -> str:
    return f"bench-session-{i % sessions}"


def seed_battles(client: redis.Redis, votes: Sequence[VoteRecord], sessions: int,
                 ttl_s: int) -> None:
    """Finished battles stored exactly as serve/battles.py stores them (no vLLM needed);
    vote i belongs to session i % sessions."""
    pipe = client.pipeline(transaction=False)
    for i, vote in enumerate(votes):
        battle = {
            "battle_id": vote.battle_id, "session": session_of(i, sessions),
            "created_at": time.time(),
            "model_a": vote.model_a, "model_b": vote.model_b,
            "conversation_a": [*vote.conversation_a,
                               {"role": "assistant", "content": vote.answer_a}],
            "conversation_b": [*vote.conversation_b,
                               {"role": "assistant", "content": vote.answer_b}],
            "answer_a": vote.answer_a, "answer_b": vote.answer_b,
        }
        key = BATTLE_KEY.format(id=vote.battle_id)
        pipe.hset(key, mapping=battle_fields(battle))
        pipe.expire(key, ttl_s)
    pipe.execute()


async def post_votes(port: int, votes: Sequence[tuple[VoteRecord, str]],
                     concurrency: int) -> tuple[np.ndarray, int]:
    """One vote per (battle, session cookie) over `concurrency` keep-alive connections, each
    sending its next vote when the answer to the last one is in (closed loop, as wrk does).
    A minimal HTTP/1.1 client on uvloop, because the load generator shares these 2 cores with
    the server it measures and Python HTTP clients cost more CPU per request than the vote
    endpoint (measured here: httpx's async pool ~70 requests/s, aiohttp ~1,500/s)."""
    latencies: list[float] = []
    accepted = 0
    queue = list(votes)

    async def connection() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                vote, cookie = queue.pop()
                body = json.dumps({"winner": vote.winner}).encode()
                request = (f"POST /v1/battles/{vote.battle_id}/vote HTTP/1.1\r\n"
                           f"Host: 127.0.0.1:{port}\r\nCookie: {COOKIE_NAME}={cookie}\r\n"
                           "Content-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(CONTENT_LENGTH.search(head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                accepted += head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return np.array(latencies), accepted


def bench_http_votes(settings: Settings, votes: Sequence[VoteRecord], concurrency: int,
                     workers: int, sessions: int, log: Path) -> Result:
    """POST /v1/battles/{id}/vote through the gateway (uvicorn, `workers` processes) with the
    archiver running; latency per request; both ends counted (2xx answers vs archived).
    Votes come from `sessions` sessions under the default per-session rate limit (checked
    in the vote script, so its cost is in the figures); the per-IP limit is off, as every
    vote comes from 127.0.0.1 here."""
    client = redis.Redis.from_url(settings.effective_redis_url)
    secret = "bench-session-secret"
    seed_battles(client, votes, sessions, 3600)
    signer = URLSafeSerializer(secret, salt="arena-session")
    cookies = [signer.dumps(session_of(i, sessions)) for i in range(sessions)]
    ballots = [(vote, cookies[i % sessions]) for i, vote in enumerate(votes)]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({"ARENA_REDIS_URL": settings.effective_redis_url,
                "ARENA_DATA_DIR": str(settings.data_dir), "ARENA_SESSION_SECRET": secret,
                "ARENA_VLLM_URLS": '["http://127.0.0.1:9"]', "ARENA_RATE_VOTE_PER_IP": "0",
                "PYTHONPATH": str(REPO)})
    gateway = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serve.app:create_app", "--factory", "--port",
         str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log",
         "--no-proxy-headers"],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    archive = Archive(settings.effective_archive_url)
    before = archive.count()
    archiver = start_archiver(settings, log.with_suffix(".archiver.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.2)
        _, warm_accepted = uvloop.run(post_votes(port, ballots[:50], 8))  # warm-up: 50
        started = time.perf_counter()
        latencies, accepted = uvloop.run(post_votes(port, ballots[50:], concurrency))
        # The clock stops when the last vote is in the archive, not at the last answer.
        wait_archived(archive, before + len(votes), archiver, 600)
        seconds = time.perf_counter() - started
    finally:
        stop_group(archiver)
        stop_group(gateway)
    arrived = check_ends(client, archive, votes)
    archive.close()
    return Result(f"http x{workers}", len(votes) - 50, seconds, latencies,
                  warm_accepted + accepted,
                  arrived, f"POST /vote, {workers} gateway worker(s), {sessions} sessions, "
                  "archiver running")


def print_results(results: Sequence[Result]) -> None:
    table = Table("section", "votes", "seconds", "votes/s", "p50 ms", "p99 ms", "sent",
                  "arrived", "note", title="vote ingest (Redis AOF appendfsync=always)")
    for r in results:
        latency = r.latencies_s.size > 0
        table.add_row(r.section, str(r.votes), f"{r.seconds:.2f}", f"{r.rate:,.0f}",
                      f"{r.percentile_ms(50):.1f}" if latency else "-",
                      f"{r.percentile_ms(99):.1f}" if latency else "-",
                      str(r.sent), str(r.arrived), r.note)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent writers")
    parser.add_argument("--writer-procs", type=int, nargs="+", default=[1, 2],
                        help="writer process counts to measure XADD with (like gateway workers)")
    parser.add_argument("--batch-size", type=int, default=500, help="archiver XREADGROUP count")
    parser.add_argument("--archive-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--http-workers", type=int, nargs="*", default=[1, 2],
                        help="gateway worker counts for the HTTP section (none: skip it)")
    parser.add_argument("--sessions", type=int, default=1000,
                        help="voting sessions in the HTTP section (each under the default "
                             "per-session rate limit: keep votes/sessions below it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vote-ingest-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        redis_proc = start_redis(port, data_dir / "redis", "always")
        settings = Settings(_env_file=None, data_dir=data_dir,
                            redis_url=f"redis://127.0.0.1:{port}/0",
                            archive_url=args.archive_url, stream_batch_size=args.batch_size,
                            stream_block_ms=100)
        try:
            console.print(f"redis-server :{port} (AOF always), archive "
                          f"{settings.effective_archive_url}, {args.votes} votes per section")
            procs = args.writer_procs
            results = [bench_xadd(settings, synthetic_votes(args.votes, seed=p), args.concurrency,
                                  p) for p in procs]
            results.append(bench_drain(settings, synthetic_votes(args.votes, seed=10),
                                       args.concurrency, procs[0], data_dir / "drain.log"))
            results.append(bench_live(settings, synthetic_votes(args.votes, seed=11),
                                      args.concurrency, procs[0], data_dir / "live.log"))
            for workers in args.http_workers:
                results.append(bench_http_votes(
                    settings, synthetic_votes(args.votes, seed=12 + workers), args.concurrency,
                    workers, args.sessions, data_dir / f"http{workers}.log"))
            print_results(results)
        finally:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


if __name__ == "__main__":
    main()
