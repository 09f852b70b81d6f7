"""The stack on one host as 1 gateway × 1 vLLM replica (the baseline) and as 2 × 2 (issue 15's
scale-out), each started by `arena up` with its topology settings, under the same client load
spread over the gateways (round-robin, as a load balancer would): chats on `current` and
battles + votes. Printed per topology: chats/s, votes/s accepted, chat p50/p95, failed
requests, then the ratio 2×2 / 1×1. Every accepted vote is checked in the archive, once.

On this 2-core machine both topologies share the same two cores, so the ratio shows what the
extra processes cost or gain here, not what a second host would add.

    .venv/bin/python benchmarks/scale_out.py                    # tiny model, 60 s per topology
    .venv/bin/python benchmarks/scale_out.py --seconds 120 --clients 8
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from feedback.archive import Archive  # noqa: E402
from testkit.processes import arena_up_env, stop_group  # noqa: E402
from testkit.tiny_model import build_tiny_model  # noqa: E402

CHAT = {"model": "current", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
BATTLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
UP_TIMEOUT_S = 600
ARCHIVE_CATCH_UP_S = 60


@dataclass
class Figures:
    chat_latencies: list[float] = field(default_factory=list)
    votes: list[str] = field(default_factory=list)
    failed: int = 0


def start_stack(work: Path, model_dir: Path, gateways: int, replicas: int
                ) -> tuple[subprocess.Popen, list[str]]:
    env = arena_up_env(work, model_dir, gateways, replicas, **{
        "ARENA_MERGED_CURRENT": "false",
        "ARENA_RATE_CHAT_PER_SESSION": "0", "ARENA_RATE_BATTLE_PER_SESSION": "0",
        "ARENA_RATE_VOTE_PER_SESSION": "0", "ARENA_RATE_CHAT_PER_IP": "0",
        "ARENA_RATE_BATTLE_PER_IP": "0", "ARENA_RATE_VOTE_PER_IP": "0",
        "ARENA_LEARN_EVERY_VOTES": "1000000000", "ARENA_ARCHIVE_CHATS": "false"})
    log = (work / "launcher.log").open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "arena.cli", "up"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while "rlhf-arena is up" not in (work / "launcher.log").read_text():
        if launcher.poll() is not None or time.monotonic() > deadline:
            stop_group(launcher)
            sys.exit(f"arena up failed; see {work / 'launcher.log'}")
        time.sleep(1)
    first = int(env["ARENA_GATEWAY_PORT"])
    return launcher, [f"http://127.0.0.1:{first + i}" for i in range(gateways)]


def client(gateways: list[str], index: int, stop: threading.Event, figures: Figures,
           lock: threading.Lock) -> None:
    """Alternately a chat and a battle + its vote; request n goes to gateway n mod G."""
    sent = index
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            gateway = gateways[sent % len(gateways)]
            sent += 1
            try:
                if sent % 2:
                    started = time.perf_counter()
                    ok = http.post(f"{gateway}/v1/chat/completions", json=CHAT).status_code == 200
                    with lock:
                        if ok:
                            figures.chat_latencies.append(time.perf_counter() - started)
                        else:
                            figures.failed += 1
                    continue
                created = http.post(f"{gateway}/v1/battles", json=BATTLE)
                if created.status_code != 200:
                    with lock:
                        figures.failed += 1
                    continue
                battle = created.json()["battle_id"]
                voted = http.post(f"{gateways[sent % len(gateways)]}/v1/battles/{battle}/vote",
                                  json={"winner": "a"})
                with lock:
                    if voted.status_code == 200:
                        figures.votes.append(battle)
                    else:
                        figures.failed += 1
            except httpx.HTTPError:
                with lock:
                    figures.failed += 1


def run_topology(model_dir: Path, gateways: int, replicas: int, clients: int,
                 seconds: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"arena-scale-{gateways}x{replicas}-"))
    print(f"{gateways} gateway(s) x {replicas} replica(s): starting `arena up` …", flush=True)
    launcher, urls = start_stack(work, model_dir, gateways, replicas)
    figures, lock, stop = Figures(), threading.Lock(), threading.Event()
    try:
        threads = [threading.Thread(target=client, args=(urls, i, stop, figures, lock))
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        archive = Archive(f"sqlite:///{work / 'var' / 'archive.db'}", create=False)
        deadline = time.monotonic() + ARCHIVE_CATCH_UP_S
        while archive.count() < len(figures.votes) and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = [s.record.vote_id for s in archive.iter_votes()]
        archive.close()
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(launcher, signal.SIGKILL)
    if sorted(stored) != sorted(figures.votes):
        sys.exit(f"archive mismatch: {len(figures.votes)} accepted, {len(stored)} archived "
                 f"({len(set(stored))} distinct); logs in {work}")
    latencies = sorted(figures.chat_latencies)
    result = {"chats_per_s": len(latencies) / seconds, "votes_per_s": len(figures.votes) / seconds,
              "chat_p50_s": statistics.median(latencies) if latencies else float("nan"),
              "chat_p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies
              else float("nan"),
              "failed": figures.failed, "votes_archived_once": len(stored)}
    print(f"   {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still run the `finally`
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="arena-scale-model-")) / "tiny")
    one = run_topology(model_dir, 1, 1, args.clients, args.seconds)
    two = run_topology(model_dir, 2, 2, args.clients, args.seconds)
    print(f"\ntiny model, {args.clients} clients, {args.seconds:.0f} s each, this machine")
    print(f"   {'':<22}{'1x1':>10}{'2x2':>10}{'ratio':>8}")
    for key in ("chats_per_s", "votes_per_s", "chat_p50_s", "chat_p95_s"):
        print(f"   {key:<22}{one[key]:>10.2f}{two[key]:>10.2f}{two[key] / one[key]:>8.2f}")
    print(f"   {'failed requests':<22}{one['failed']:>10}{two['failed']:>10}")
    if args.json:
        args.json.write_text(json.dumps({"1x1": one, "2x2": two}, indent=2))


if __name__ == "__main__":
    main()
