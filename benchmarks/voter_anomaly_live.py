"""Benchmark: the voter anomaly defence in the live stack, against the simulated crowd.

`benchmarks/voter_anomaly.py` feeds the scorer directly; this one goes through everything a
vote passes: the gateway (sessions, battles, the vote route), the vote stream, the
`voter-scorer` consumer and the archive's `voters` table. A crowd (`arena simulate`'s, public
API only, after an honest warm-up crowd) of `--voters` sessions, the last `--stuffers` of them
voting at random
(`random_votes`), then a second crowd whose stuffers always vote "a" (`always_a`); the honest
voters use the key-noun judge with 10 % noise. Printed per crowd and over both: precision and
recall of the flags (targets >= 0.9 / >= 0.8) and the highest honest score (flagged at 3).

It starts its own stack (`arena up` on a fresh data dir and free ports, the learner kept out
of the way, SmolLM2) and stops it at the end:

    .venv/bin/python benchmarks/voter_anomaly_live.py             # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import Settings  # noqa: E402
from crowd.judges import get_judge  # noqa: E402
from crowd.prompts import load_prompts  # noqa: E402
from crowd.simulate import CrowdPlan, CrowdSummary, run_crowd  # noqa: E402
from feedback.archive import Archive  # noqa: E402
from testkit.net import free_port_ranges  # noqa: E402

HONEST_JUDGE = "key_noun_noisy"
STUFFER_KINDS = ("random_votes", "always_a")
SETTLE_TIMEOUT_S = 120.0  # for the consumers to archive and score the last votes
STARTUP_TIMEOUT_S = 600.0
WARMUP_SETTLE_S = 20.0  # for the ratings refit after the warm-up crowd


@contextlib.contextmanager
def stack(data_dir: Path) -> Iterator[Settings]:
    """`arena up` on `data_dir` and free ports, until the gateway answers; stopped after."""
    gateway_port, vllm_port, redis_port = free_port_ranges(1, 1, 1)
    env = {**os.environ, "ARENA_DATA_DIR": str(data_dir), "ARENA_LEARN_EVERY_VOTES": "1000000",
           "ARENA_GATEWAY_PORT": str(gateway_port), "ARENA_VLLM_PORT": str(vllm_port),
           "ARENA_REDIS_PORT": str(redis_port)}
    data_dir.mkdir(parents=True)
    for key in ("ARENA_GATEWAY_URL", "ARENA_REDIS_URL", "ARENA_ARCHIVE_URL"):
        env.pop(key, None)
    log = (data_dir / "up.log").open("w")
    process = subprocess.Popen([str(Path(sys.executable).parent / "arena"), "up"], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("ARENA_")})
        settings = Settings()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"arena up exited; see {data_dir / 'up.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{settings.gateway_url}/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not come up; see {data_dir / 'up.log'}")
            time.sleep(2.0)
        yield settings
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def precision_recall(flagged: set[str], stuffers: set[str],
                     sessions: set[str]) -> tuple[float, float]:
    """Of the flagged among `sessions`, the share that are stuffers; of the stuffers, the
    share flagged (1.0 where nothing was there to find or flag)."""
    flagged_here = flagged & sessions
    hits = len(flagged_here & stuffers)
    precision = hits / len(flagged_here) if flagged_here else 1.0
    recall = hits / len(stuffers) if stuffers else 1.0
    return precision, recall


def wait_settled(archive: Archive, battle_ids: set[str]) -> dict[str, str]:
    """battle id → session of the crowd's votes, once all are archived and scored."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        sessions = {stored.record.battle_id: stored.record.session
                    for stored in archive.iter_votes() if stored.record.battle_id in battle_ids}
        scored = set(archive.voter_scores()) >= set(sessions.values())
        if (len(sessions) == len(battle_ids) and scored) or time.monotonic() > deadline:
            return sessions
        time.sleep(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voters", type=int, default=20)
    parser.add_argument("--stuffers", type=int, default=2, help="per crowd (10 %% of 20)")
    parser.add_argument("--battles", type=int, default=600, help="per crowd")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200, help="honest battles before")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anomaly-") as tmp, \
            stack(Path(tmp) / "var") as settings:
        run(settings, args)


def run(settings: Settings, args: argparse.Namespace) -> None:
    archive = Archive(settings.effective_archive_url, create=False)
    prompts = load_prompts()
    print(f"gateway {settings.gateway_url}: {args.voters} voters a crowd, {args.stuffers} "
          f"stuffers, {args.battles} battles, honest judge {HONEST_JUDGE}")
    # Warm-up: an honest crowd first, so that the pair's outcome rates the scorer tests each
    # vote against are established (the first run without it scored every session 0).
    warmup = CrowdPlan(url=settings.gateway_url, voters=args.voters, battles=args.warmup,
                       chat_share=0.0, seed=0, max_tokens=args.max_tokens, timeout_s=3600.0)
    asyncio.run(run_crowd(warmup, get_judge(HONEST_JUDGE), prompts))
    wait_settled(archive, set())
    time.sleep(WARMUP_SETTLE_S)
    all_flagged, all_stuffers, all_sessions = set(), set(), set()
    for seed, kind in enumerate(STUFFER_KINDS, start=1):
        plan = CrowdPlan(url=settings.gateway_url, voters=args.voters, battles=args.battles,
                         chat_share=0.0, seed=seed, max_tokens=args.max_tokens,
                         stuffers=args.stuffers, timeout_s=3600.0)
        started = time.monotonic()
        summary: CrowdSummary = asyncio.run(run_crowd(
            plan, get_judge(HONEST_JUDGE), prompts, stuffer_judge=get_judge(kind)))
        session_of = wait_settled(archive, set(summary.accepted_battle_ids))
        sessions = set(session_of.values())
        stuffers = {session_of[b] for b in summary.stuffer_battle_ids if b in session_of}
        scores = archive.voter_scores()
        flagged = set(archive.flagged_voters())
        precision, recall = precision_recall(flagged, stuffers, sessions)
        honest_max = max((scores.get(s, 0.0) for s in sessions - stuffers), default=0.0)
        stuffer_min = min((scores.get(s, 0.0) for s in stuffers), default=float("nan"))
        print(f"{kind:12s} {summary.votes_accepted} votes ({len(summary.stuffer_battle_ids)} "
              f"from stuffers) in {time.monotonic() - started:.0f} s, {summary.errors} errors; "
              f"{len(sessions)} sessions; flagged {len(flagged & sessions)}: precision "
              f"{precision:.2f}, recall {recall:.2f}; highest honest score {honest_max:.2f}, "
              f"lowest stuffer score {stuffer_min:.2f}", flush=True)
        all_flagged |= flagged & sessions
        all_stuffers |= stuffers
        all_sessions |= sessions
    precision, recall = precision_recall(all_flagged, all_stuffers, all_sessions)
    print(f"both crowds: precision {precision:.2f} (target >= 0.9), recall {recall:.2f} "
          f"(target >= 0.8), {len(all_stuffers)} stuffers among {len(all_sessions)} sessions")


if __name__ == "__main__":
    main()
