"""Chat on `current` at the base model's speed (issue 16): the current version as a LoRA adapter
vs on its merged weights, against the base model, in one run.

Starts its own Redis, vLLM LoRA replica (the launcher's command) and gateway (a separate uvicorn
process), registers a LoRA version like the learner's (rank 16 on the six projections) and
promotes it, then measures through the gateway, N concurrent requests in waves:

  1. base vs `current` on the LoRA path (rounds interleaved), before any merged replica;
  2. starts the merged-replica manager (`arena merged-replica`, as `arena up` does): the time
     from its start to `current` being served from merged weights (merge + replica start);
  3. base vs `current` on the merged replica (rounds interleaved) — the target: ≥ 90 % of base;
  4. mixed: chat on `current` while battles run between base and an older LoRA version.

    .venv/bin/python benchmarks/merged_serving.py                # SmolLM2 (var/models/base)
    .venv/bin/python benchmarks/merged_serving.py --model tiny   # tiny random model
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arena.redis_server import start_redis  # noqa: E402
from benchmarks.serve_overhead import load_run  # noqa: E402
from core.vllm_server import vllm_command  # noqa: E402
from deploy.admin_client import AdminClient  # noqa: E402
from learner.presets import DEFAULT_LORA_TARGETS  # noqa: E402
from serve.merged_serving import MERGED_KEY, MergedServing  # noqa: E402
from testkit.load_options import load_parser  # noqa: E402
from testkit.net import wait_http  # noqa: E402
from testkit.processes import loopback_settings, start_arena, start_gateway, stop_group  # noqa: E402
from testkit.tiny_model import benchmark_model, build_lora_adapter  # noqa: E402

LEARNER_RANK = 16  # the cpu/gpu presets' policy adapters


def interleaved(gw_url: str, rounds: int, concurrency: int, requests: int,
                max_tokens: int) -> dict[str, list[dict[str, float]]]:
    """`rounds` rounds of base, then current, alternating, so drift hits both alike."""
    runs: dict[str, list[dict[str, float]]] = {"base": [], "current": []}
    for i in range(rounds):
        for model in ("base", "current"):
            runs[model].append(asyncio.run(load_run(gw_url, [model], concurrency, requests,
                                                    max_tokens)))
        print(f"   round {i + 1}: base {runs['base'][-1]['tok_s']:.1f} tokens/s, current "
              f"{runs['current'][-1]['tok_s']:.1f}", flush=True)
    return runs


def median_tok_s(runs: list[dict[str, float]]) -> float:
    return statistics.median(r["tok_s"] for r in runs)


async def mixed_run(gw_url: str, chat: int, battles: int, requests: int, max_tokens: int,
                    battle_models: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Chat on `current` (`chat` at a time) while `battles` requests at a time go to the
    battle models (the LoRA path), both for the same wall time."""
    chat_task = asyncio.create_task(load_run(gw_url, ["current"], chat, requests, max_tokens))
    battle_task = asyncio.create_task(load_run(gw_url, battle_models, battles,
                                               max(battles, requests * battles // chat),
                                               max_tokens))
    return await chat_task, await battle_task


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--battle-concurrency", type=int, default=2,
                        help="battle requests at a time in the mixed run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still run the `finally`

    work = Path(tempfile.mkdtemp(prefix="arena-merged-"))
    model_dir, tiny = benchmark_model(args.model, work)
    settings = loopback_settings(work, model_dir, tiny)
    vllm_port, redis_port = settings.vllm_port, settings.redis_port
    vllm_url, gw_url = settings.effective_vllm_urls[0], settings.gateway_url
    token = settings.admin_token.get_secret_value()
    procs: list[subprocess.Popen] = [start_redis(redis_port, work / "redis", "everysec")]
    figures: dict = {"model": str(model_dir), "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens}
    try:
        argv, vllm_env = vllm_command(settings, model_dir, vllm_port)
        print(f"starting vLLM (LoRA replica) on {model_dir.name} …", flush=True)
        procs.append(subprocess.Popen(argv, env=vllm_env, stdout=(work / "vllm.log").open("a"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(start_gateway(settings, work / "gateway.log"))
        wait_http(f"{vllm_url}/health", settings.vllm_start_timeout_s)
        wait_http(f"{gw_url}/livez", 60)

        imports = settings.data_dir / "imports"  # an import root: the admin API takes it
        adapters = [build_lora_adapter(model_dir, imports / f"lora{seed}", seed=seed,
                                       rank=LEARNER_RANK, targets=DEFAULT_LORA_TARGETS)
                    for seed in (1, 2)]
        with AdminClient(gw_url, token, actor="benchmark") as admin:
            older, version = (admin.register(path)["id"] for path in adapters)
            admin.promote(version)
        asyncio.run(load_run(gw_url, ["base", "current", older], 4, 8, 8))  # warm-up

        print(f"\n1) LoRA path: {args.rounds} interleaved rounds x {args.requests} requests, "
              f"concurrency {args.concurrency}, {args.max_tokens} tokens each", flush=True)
        lora = interleaved(gw_url, args.rounds, args.concurrency, args.requests,
                           args.max_tokens)

        print("\n2) starting the merged-replica manager …", flush=True)
        started = time.monotonic()
        procs.append(start_arena(settings, work / "merged.log", "merged-replica"))
        store = redis.Redis(port=redis_port)
        while (merged := MergedServing.from_json(store.get(MERGED_KEY))) is None:
            if procs[-1].poll() is not None or time.monotonic() - started > 900:
                sys.exit(f"no merged replica; see {work / 'merged.log'}")
            time.sleep(0.5)
        figures["to_merged_s"] = time.monotonic() - started
        print(f"   {merged.version} served from merged weights after "
              f"{figures['to_merged_s']:.1f} s (merge + replica start)", flush=True)
        asyncio.run(load_run(gw_url, ["current"], 4, 8, 8))  # warm-up

        print(f"\n3) merged: {args.rounds} interleaved rounds, same load", flush=True)
        merged_runs = interleaved(gw_url, args.rounds, args.concurrency, args.requests,
                                  args.max_tokens)

        print(f"\n4) mixed: {args.concurrency} chat on current + {args.battle_concurrency} "
              f"battle requests (base, {older}) at a time", flush=True)
        chat, battles = asyncio.run(mixed_run(gw_url, args.concurrency,
                                              args.battle_concurrency, args.requests,
                                              args.max_tokens, ["base", older]))

        base_lora, base_merged = median_tok_s(lora["base"]), median_tok_s(merged_runs["base"])
        current_lora = median_tok_s(lora["current"])
        current_merged = median_tok_s(merged_runs["current"])
        figures.update({"base_tok_s_phase1": base_lora, "current_lora_tok_s": current_lora,
                        "base_tok_s_phase3": base_merged,
                        "current_merged_tok_s": current_merged,
                        "ratio_lora": current_lora / base_lora,
                        "ratio_merged": current_merged / base_merged,
                        "mixed_chat_tok_s": chat["tok_s"], "mixed_battle_tok_s": battles["tok_s"]})
        print(f"\n{model_dir.name}, {args.concurrency} concurrent, {args.max_tokens} tokens, "
              f"median of {args.rounds} rounds (tokens/s, through the gateway)")
        print(f"   {'':<28}{'base':>10}{'current':>10}{'ratio':>9}")
        print(f"   {'current as LoRA (before)':<28}{base_lora:>10.1f}{current_lora:>10.1f}"
              f"{current_lora / base_lora:>9.2f}")
        print(f"   {'current merged (now)':<28}{base_merged:>10.1f}{current_merged:>10.1f}"
              f"{current_merged / base_merged:>9.2f}   (target ≥ 0.90)")
        print(f"   mixed: chat on current {chat['tok_s']:.1f} tokens/s (p50 {chat['p50']:.2f} s) "
              f"+ battles {battles['tok_s']:.1f} tokens/s")
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    print(f"logs: {work}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
