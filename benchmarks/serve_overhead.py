"""Gateway overhead, LoRA mix cost, and vLLM vs plain transformers `generate`.

Starts its own vLLM server, Redis and gateway (a separate uvicorn process, as in production),
then, in the same run and with the same prompts:
  1. N concurrent chat requests (waves of N sent at once) through the gateway vs straight to
     vLLM, rounds interleaved so drift hits both alike: p50/p95 latency, tokens/s, ratios
     (target: +≤3 % p50, ≥97 % tokens/s), and the gateway's own CPU time per request;
  2. tokens/s with base alone vs 1 vs 4 LoRA versions in the request mix;
  3. vLLM vs transformers `generate` on the same batch.

    .venv/bin/python benchmarks/serve_overhead.py                # SmolLM2 (var/models/base)
    .venv/bin/python benchmarks/serve_overhead.py --model tiny   # tiny random model
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arena.redis_server import start_redis  # noqa: E402
from core.vllm_server import vllm_command  # noqa: E402
from testkit.load_options import load_parser  # noqa: E402
from testkit.net import wait_http  # noqa: E402
from testkit.processes import loopback_settings, start_gateway, stop_group  # noqa: E402
from testkit.tiny_model import benchmark_model, build_lora_adapter  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn.", "What is 17 times 23?",
    "Give me three tips for learning Python.", "Summarise the plot of Hamlet.",
    "How do vaccines work?", "Describe a cat to someone who has never seen one.",
    "What are the benefits of exercise?",
]






def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def load_run(base_url: str, models: list[str], concurrency: int, requests: int,
                   max_tokens: int) -> dict[str, float]:
    """`requests` chat completions in waves of `concurrency` sent at once (the next wave when
    the last answer of this one is in), models taken round-robin. Waves give both paths the
    same arrival pattern; a closed loop lets requests drift apart and mix prefills into the
    decode batches, which was measured to swing a round's p50 by ±20 % either way."""
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async def one(i: int) -> None:
            nonlocal tokens
            body = {"model": models[i % len(models)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            t0 = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        for wave in range(0, requests, concurrency):
            await asyncio.gather(*(one(i) for i in range(wave, min(wave + concurrency,
                                                                     requests))))
        wall = time.perf_counter() - started
    return {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "tok_s": tokens / wall, "n": len(latencies)}


async def paired_run(direct_url: str, gateway_url: str, concurrency: int, rounds: int,
                     max_tokens: int) -> list[tuple[float, float]]:
    """Waves of `concurrency` requests, half straight to vLLM and half through the gateway,
    the same prompt on both sides of each pair: both halves share every decode batch, so
    vLLM's own round-to-round swings cancel and what is left is the gateway's hop. Returns
    (direct p50, gateway p50) per wave."""
    per_wave = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(url: str, i: int) -> float:
            body = {"model": "base", "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            t0 = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            return time.perf_counter() - t0

        for wave in range(rounds):
            pairs = concurrency // 2
            direct = [one(direct_url, wave * pairs + i) for i in range(pairs)]
            gateway = [one(gateway_url, wave * pairs + i) for i in range(pairs)]
            latencies = await asyncio.gather(*direct, *gateway)
            per_wave.append((statistics.median(latencies[:pairs]),
                             statistics.median(latencies[pairs:])))
    return per_wave


def merge(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in ("p50", "p95", "tok_s")}


def transformers_generate(model_dir: Path, batch: int, max_tokens: int) -> float:
    """Tokens/s of plain `generate` on one left-padded batch (greedy, fixed length)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % 8]}],
                                           tokenize=False, add_generation_prompt=True)
             for i in range(batch)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        wall = time.perf_counter() - t0
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
    return generated / wall


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--max-loras", type=int, default=4, help="vLLM's --max-loras")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="vLLM's --max-lora-rank")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    # A timeout's SIGTERM must still run the `finally` below, or the servers outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="arena-bench-"))
    model_dir, tiny = benchmark_model(args.model, work)
    settings = loopback_settings(work, model_dir, tiny,
                                 vllm_max_loras=args.max_loras,
                                 vllm_max_lora_rank=args.max_lora_rank)
    vllm_port, redis_port, gw_port = settings.vllm_port, settings.redis_port, settings.gateway_port
    vllm_url = settings.effective_vllm_urls[0]
    procs: list[subprocess.Popen] = []
    try:
        argv, env = vllm_command(settings, model_dir, vllm_port)
        print(f"starting vLLM on {model_dir.name} …", flush=True)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        procs.append(start_redis(redis_port, work / "redis", "everysec"))
        procs.append(start_gateway(settings, work / "gateway.log"))
        wait_http(f"{vllm_url}/health", 600)
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{gw_url}/livez", 60)

        # Warm-up both paths (first requests compile / allocate).
        asyncio.run(load_run(vllm_url, ["base"], 2, 4, 8))
        asyncio.run(load_run(gw_url, ["base"], 2, 4, 8))

        print(f"\n1) gateway overhead: {args.rounds} interleaved rounds x {args.requests} "
              f"requests, concurrency {args.concurrency}, {args.max_tokens} tokens each")
        direct, gateway = [], []
        gateway_pid = procs[2].pid
        gateway_cpu = 0.0
        for i in range(args.rounds):
            direct.append(asyncio.run(load_run(vllm_url, ["base"], args.concurrency,
                                               args.requests, args.max_tokens)))
            cpu_before = cpu_seconds(gateway_pid)
            gateway.append(asyncio.run(load_run(gw_url, ["base"], args.concurrency,
                                                args.requests, args.max_tokens)))
            gateway_cpu += cpu_seconds(gateway_pid) - cpu_before
            dr, gr = direct[-1], gateway[-1]
            print(f"   round {i + 1}: p50 vLLM {dr['p50']:.3f}s gateway {gr['p50']:.3f}s "
                  f"({100 * (gr['p50'] / dr['p50'] - 1):+.1f} %), tokens/s {dr['tok_s']:.1f} "
                  f"vs {gr['tok_s']:.1f}", flush=True)
        d, g = merge(direct), merge(gateway)
        print(f"   {'path':<10}{'p50 s':>10}{'p95 s':>10}{'tokens/s':>12}")
        print(f"   {'vLLM':<10}{d['p50']:>10.3f}{d['p95']:>10.3f}{d['tok_s']:>12.1f}")
        print(f"   {'gateway':<10}{g['p50']:>10.3f}{g['p95']:>10.3f}{g['tok_s']:>12.1f}")
        print(f"   p50 overhead {100 * (g['p50'] / d['p50'] - 1):+.2f} % (target ≤ +3 %), "
              f"tokens/s kept {100 * g['tok_s'] / d['tok_s']:.1f} % (target ≥ 97 %)")
        print(f"   gateway CPU: {1000 * gateway_cpu / (args.rounds * args.requests):.1f} ms "
              "per request (user + system, the gateway process, background tasks included)")

        print(f"\n1b) paired: {args.rounds * 2} waves of {args.concurrency} requests, half "
              "direct and half through the gateway in the same wave (same prompts)")
        waves = asyncio.run(paired_run(vllm_url, gw_url, args.concurrency, args.rounds * 2,
                                       args.max_tokens))
        added = [g / d - 1 for d, g in waves]
        print(f"   gateway p50 vs direct p50 in the same wave: median "
              f"{100 * statistics.median(added):+.2f} % (waves: "
              f"{', '.join(f'{100 * a:+.1f}' for a in added)})")

        if not args.skip_lora:
            print("\n2) LoRA versions in the mix (through the gateway, same load)")
            import redis as redis_lib

            from deploy.registry import Registry, VersionRecord

            registry = Registry(redis_lib.Redis(port=redis_port))
            versions = []
            for seed in range(1, 5):
                path = build_lora_adapter(model_dir, work / f"lora{seed}", seed=seed)
                version = registry.next_id("policy")
                registry.add(VersionRecord(id=version, kind="policy", state="candidate",
                                           parent="base", path=str(path)))
                versions.append(version)
            asyncio.run(load_run(gw_url, versions, 4, 8, 8))  # load adapters, warm up
            mixes = {"base only": ["base"], "base + 1 LoRA": ["base", versions[0]],
                     "base + 4 LoRA": ["base", *versions], "1 LoRA only": versions[:1]}
            results = {name: asyncio.run(load_run(gw_url, models, args.concurrency,
                                                  args.requests, args.max_tokens))
                       for name, models in mixes.items()}
            base_tps = results["base only"]["tok_s"]
            for name, r in results.items():
                share = 100 * r["tok_s"] / base_tps
                print(f"   {name:<16}{r['tok_s']:>10.1f} tokens/s  ({share:5.1f} % of base)  "
                      f"p50 {r['p50']:.3f}s")

        if not args.skip_transformers:
            print(f"\n3) vLLM vs transformers generate, batch {args.concurrency}, "
                  f"{args.max_tokens} tokens")
            v = asyncio.run(load_run(vllm_url, ["base"], args.concurrency, args.concurrency,
                                     args.max_tokens))
            for proc in procs[:1]:  # free the cores for a fair transformers run
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            hf = transformers_generate(model_dir, args.concurrency, args.max_tokens)
            print(f"   vLLM {v['tok_s']:.1f} tokens/s, transformers {hf:.1f} tokens/s, "
                  f"ratio {v['tok_s'] / hf:.2f}x")
    finally:
        for proc in procs:
            stop_group(proc)


if __name__ == "__main__":
    main()
