"""Redis retention benchmark: what Redis still holds per vote once the votes are through.

Pushes `--votes` votes through the real path, in chunks, on a private redis-server (AOF):
finished battles stored as serve/battles.py stores them (TTL `--battle-ttl-s`), each voted by
the gateway's vote script (feedback/vote_stream.py `VoteAcceptor`: battle, once-only guard
with the battle's TTL, XADD), with the feedback consumers (`arena consumers`:
archiver, ranker, learner trigger) following; one malformed entry per `--malformed-every`
votes goes to the dead letters (each of the three groups dead-letters its own copy). After
half the votes and after all of them, once the consumers have drained, the battles have
expired and the dedup window (`--dedup-ttl-s`) has passed, it reads every key's MEMORY USAGE
and INFO memory, and prints bytes per vote and, per structure, what it holds.

Baseline beside it, same run, same votes: the consumers of the last commit before retention
(`--baseline-ref`, extracted with `git archive`): counted vote ids in plain sets kept
forever, dead letters without a cap. The figure that matters is the marginal cost: bytes
added per vote between the two checkpoints (0 = nothing grows per vote).

    .venv/bin/python benchmarks/redis_retention.py                # 100,000 votes, 2 runs, ~8 min
    .venv/bin/python benchmarks/redis_retention.py --votes 20000  # quicker look

Rate limits are off here (the per-session and per-IP counters are one key per window, not
per vote, and expire after 2 minutes); the Bradley-Terry refit runs once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import redis
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vote_ingest import seed_battles, session_of  # noqa: E402  (benchmarks/ is sys.path[0])

from arena.redis_server import start_redis  # noqa: E402
from feedback.archive import Archive  # noqa: E402
from feedback.consumers import HOUSEKEEPING_EVERY_S  # noqa: E402
from feedback.vote_record import VoteRecord  # noqa: E402
from feedback.vote_stream import RECORD_FIELD, VOTES_STREAM, VoteAcceptor, VoteKeys  # noqa: E402
from serve.battles import BATTLE_KEY, VOTED_KEY  # noqa: E402
from serve.rate_limit import KEY_TTL_S  # noqa: E402
from testkit.net import free_port  # noqa: E402
from testkit.processes import stop_group  # noqa: E402
from testkit.synthetic_votes import synthetic_votes  # noqa: E402

console = Console(width=160)
BASELINE_REF = "ed44443"  # the last commit before retention (issue 12)
SESSIONS = 1000
VOTE_CONCURRENCY = 64
# Key families, first match wins.
FAMILIES = (
    ("vote stream", re.compile(r"^arena:votes$")),
    ("dead letters", re.compile(r"^arena:votes:dead$")),
    ("ranker's counted ids", re.compile(r"^arena:ratings:online:applied$")),
    ("trigger's counted ids", re.compile(r"^arena:learner:counted$")),
    ("vote guards", re.compile(r"^arena:battle:[^:]+:voted$")),
    ("battles", re.compile(r"^arena:battle:[^:]+$")),
    ("other (ratings, fit, counters)", re.compile(r".")),
)


@dataclasses.dataclass
class Snapshot:
    votes: int
    used_memory: int  # INFO memory used_memory, minus the empty server's
    keys: dict[str, tuple[int, int, int]]  # family -> (keys, elements, MEMORY USAGE bytes)

    @property
    def key_bytes(self) -> int:
        return sum(size for _, _, size in self.keys.values())


@dataclasses.dataclass
class Run:
    label: str
    snapshots: list[Snapshot]

    def marginal(self, pick: str = "keys") -> float:
        """Bytes added per vote between the first and the last snapshot."""
        first, last = self.snapshots[0], self.snapshots[-1]
        grown = (last.key_bytes - first.key_bytes if pick == "keys"
                 else last.used_memory - first.used_memory)
        return grown / (last.votes - first.votes)


def elements(client: redis.Redis, key: bytes, kind: bytes) -> int:
    sizes = {b"stream": client.xlen, b"zset": client.zcard, b"set": client.scard,
             b"list": client.llen}
    return int(sizes[kind](key)) if kind in sizes else 1


def snapshot(client: redis.Redis, votes: int, empty_memory: int) -> Snapshot:
    """Every key's MEMORY USAGE by family (SCAN also expires the keys that are due), then
    INFO memory."""
    keys: dict[str, list[int]] = {name: [0, 0, 0] for name, _ in FAMILIES}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        size = client.memory_usage(key, samples=0)
        if size is None:  # expired between SCAN and now
            continue
        family = next(name for name, pattern in FAMILIES if pattern.match(key.decode()))
        counts = keys[family]
        counts[0] += 1
        counts[1] += elements(client, key, kind)
        counts[2] += int(size)
    used = int(client.info("memory")["used_memory"]) - empty_memory
    return Snapshot(votes, used, {name: (k, e, b) for name, (k, e, b) in keys.items()})


# --- the producer: the gateway's vote script --------------------------------------------------
async def vote_all(url: str, votes: Sequence[VoteRecord], ttl_s: int) -> int:
    """Vote each battle once through VoteAcceptor, `VOTE_CONCURRENCY` at a time, from the
    session seed_battles gave it; returns how many were accepted (200)."""
    client = aioredis.Redis.from_url(url, max_connections=VOTE_CONCURRENCY)
    acceptor = VoteAcceptor(client)
    queue = iter(enumerate(votes))
    accepted = 0

    async def voter() -> None:
        nonlocal accepted
        for i, vote in queue:
            keys = VoteKeys(BATTLE_KEY.format(id=vote.battle_id),
                            VOTED_KEY.format(id=vote.battle_id), "unused", "unused")
            outcome = await acceptor.accept(keys, vote.battle_id, session_of(i, SESSIONS),
                                            vote.winner, ttl_s, 0, 0, KEY_TTL_S)
            accepted += outcome.status == 200

    try:
        await asyncio.gather(*(voter() for _ in range(VOTE_CONCURRENCY)))
    finally:
        await client.aclose()
    return accepted


def push(client: redis.Redis, url: str, votes: Sequence[VoteRecord], first: int,
         battle_ttl_s: int, malformed_every: int) -> None:
    seed_battles(client, votes, SESSIONS, battle_ttl_s)
    accepted = asyncio.run(vote_all(url, votes, battle_ttl_s))
    if accepted != len(votes):
        raise RuntimeError(f"only {accepted} of {len(votes)} votes accepted")
    with client.pipeline(transaction=False) as pipe:
        for n in range(len(votes) // malformed_every):
            pipe.xadd(VOTES_STREAM, {RECORD_FIELD: f"not a vote {first + n}"})
        pipe.execute()


# --- the consumers ----------------------------------------------------------------------------
def start_consumers(env: dict[str, str], source: Path, log: Path) -> subprocess.Popen:
    """`arena consumers` (all groups) from `source` (this tree or the baseline's, whose
    trees before the runner moved to arena/consumers.py start it as `-m feedback.consumers`)."""
    command = (["-m", "arena.cli", "consumers"] if (source / "arena/consumers.py").exists()
               else ["-m", "feedback.consumers"])
    return subprocess.Popen([sys.executable, *command],
                            env={**env, "PYTHONPATH": str(source)}, cwd=log.parent,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_drained(client: redis.Redis, archive: Archive, archived: int, proc: subprocess.Popen,
                 timeout_s: float = 1800) -> None:
    """Until the archive has `archived` votes and every group has read and acked everything."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"consumers exited with {proc.returncode}")
        last = client.xinfo_stream(VOTES_STREAM)["last-generated-id"]
        groups = client.xinfo_groups(VOTES_STREAM)
        if (archive.count() >= archived and len(groups) == 3 and all(
                g["pending"] == 0 and g["last-delivered-id"] == last for g in groups)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not drained in {timeout_s}s: {archive.count()} of {archived}")
        time.sleep(0.5)


def extract_baseline(ref: str, into: Path) -> Path:
    """The baseline's source tree (`git archive <ref>`), importable as the project."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(label: str, source: Path, all_votes: Sequence[VoteRecord], args: argparse.Namespace,
        work: Path) -> Run:
    work.mkdir(parents=True)
    port = free_port()
    redis_proc = start_redis(port, work / "redis", "everysec")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({
        "ARENA_REDIS_URL": url, "ARENA_DATA_DIR": str(work),
        "ARENA_ARCHIVE_URL": f"sqlite:///{work / 'archive.db'}",
        "ARENA_STREAM_BATCH_SIZE": "500", "ARENA_STREAM_BLOCK_MS": "100",
        "ARENA_LEARN_EVERY_VOTES": str(10**9), "ARENA_REFIT_EVERY_S": str(10**6),
        "ARENA_BATTLE_TTL_S": str(args.battle_ttl_s),
        "ARENA_STREAM_DEDUP_TTL_S": str(args.dedup_ttl_s),
        "ARENA_STREAM_REPLAY_WINDOW_S": str(args.dedup_ttl_s - 1),
        "ARENA_STREAM_DEAD_LETTER_MAXLEN": str(args.dead_letter_maxlen),
        "PYTHONUNBUFFERED": "1",
    })
    empty_memory = int(client.info("memory")["used_memory"])
    consumers = start_consumers(env, source, work / "consumers.log")
    archive = Archive(f"sqlite:///{work / 'archive.db'}")
    snapshots = []
    # Battles, their guards and the counted ids are due once this long after the last vote;
    # housekeeping then needs up to one period to forget the ids.
    settle_s = max(args.battle_ttl_s, args.dedup_ttl_s) + HOUSEKEEPING_EVERY_S + 3
    try:
        half = len(all_votes) // 2
        for start, end in ((0, half), (half, len(all_votes))):
            for chunk in range(start, end, args.chunk):
                push(client, url, all_votes[chunk:min(chunk + args.chunk, end)], chunk,
                     args.battle_ttl_s, args.malformed_every)
            wait_drained(client, archive, end, consumers)
            console.print(f"{label}: {end:,} votes archived and counted; settling {settle_s:.0f}s")
            time.sleep(settle_s)
            snapshots.append(snapshot(client, end, empty_memory))
    finally:
        stop_group(consumers)
        archive.close()
        client.close()
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    return Run(label, snapshots)


def print_results(runs: Sequence[Run]) -> None:
    table = Table("run", "votes", "structure", "keys", "elements", "bytes", "bytes/vote",
                  title="Redis after the votes are through (battles expired, dedup window "
                  "passed)")
    for r in runs:
        for snap in r.snapshots:
            for family, (keys, items, size) in snap.keys.items():
                if keys:
                    table.add_row(r.label, f"{snap.votes:,}", family, f"{keys:,}",
                                  f"{items:,}", f"{size:,}", f"{size / snap.votes:.1f}")
            table.add_row(r.label, f"{snap.votes:,}", "[bold]all keys (MEMORY USAGE)",
                          "", "", f"{snap.key_bytes:,}", f"{snap.key_bytes / snap.votes:.1f}")
            table.add_row(r.label, f"{snap.votes:,}", "[bold]INFO used_memory (delta)", "", "",
                          f"{snap.used_memory:,}", f"{snap.used_memory / snap.votes:.1f}",
                          end_section=True)
    console.print(table)
    summary = Table("run", "bytes/vote at the end (keys)", "bytes added per vote, half -> end "
                    "(keys)", "(INFO used_memory)", title="per vote")
    for r in runs:
        last = r.snapshots[-1]
        summary.add_row(r.label, f"{last.key_bytes / last.votes:.2f}", f"{r.marginal():.2f}",
                        f"{r.marginal('used'):.2f}")
    ours, baseline = runs
    last_ours, last_base = ours.snapshots[-1], baseline.snapshots[-1]
    summary.add_row("ratio ours / baseline",
                    f"{last_ours.key_bytes / last_base.key_bytes:.4f}",
                    f"{ours.marginal() / baseline.marginal():.4f}", "")
    console.print(summary)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=10_000,
                        help="battles seeded and voted at a time")
    parser.add_argument("--battle-ttl-s", type=int, default=15)
    parser.add_argument("--dedup-ttl-s", type=int, default=15,
                        help="how long counted vote ids are remembered (replay window: 1 s less)")
    parser.add_argument("--malformed-every", type=int, default=20,
                        help="one malformed entry per this many votes (dead letters)")
    parser.add_argument("--dead-letter-maxlen", type=int, default=1000,
                        help="ARENA_STREAM_DEAD_LETTER_MAXLEN (below the dead letters of half "
                             "the votes, so the cap shows)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF,
                        help="git ref of the consumers before retention")
    args = parser.parse_args(argv)
    votes = synthetic_votes(args.votes, seed=7)
    with tempfile.TemporaryDirectory(prefix="redis-retention-") as tmp:
        root = Path(tmp)
        baseline_source = extract_baseline(args.baseline_ref, root / "baseline-src")
        console.print(f"{args.votes:,} votes per run, battle TTL {args.battle_ttl_s}s, dedup "
                      f"window {args.dedup_ttl_s}s, baseline {args.baseline_ref}")
        runs = [run("ours", REPO, votes, args, root / "ours"),
                run(f"baseline {args.baseline_ref}", baseline_source, votes, args,
                    root / "baseline")]
        print_results(runs)


if __name__ == "__main__":
    main()
