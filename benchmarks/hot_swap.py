"""Hot swap under load, and the alternative users have today (restart vLLM with new weights).

Starts its own Redis, vLLM server and gateway (a separate uvicorn process, as in production),
registers two LoRA versions through the admin API, then keeps N clients looping on chat
completions with model="current" (official `openai` client, no retries) and:

  1. promotes the versions in turn (--swaps times): for each, the time the promote call
     takes (load into every replica + flip the alias); the time from the call to the first
     token and to the whole response of a request sent as soon as the call returns (it must
     be served by the new version); when the looping clients, busy with requests begun on
     the old version, first get a response from the new one; and the requests that failed;
  2. restarts the vLLM server with the new weights (`--lora-modules`), under the same load:
     the time from stopping it to the first answer from the new weights, and the requests
     that failed meanwhile (a client whose request failed waits 0.1 s before the next).

With --merged the merged-replica manager runs too (as under `arena up`) and the swaps are
promote → consolidate → promote → consolidate → rollback → consolidate: after each, the time
until `current` is served from its merged weights, the requests failed across the move.

    .venv/bin/python benchmarks/hot_swap.py                  # var/models/base, else tiny
    .venv/bin/python benchmarks/hot_swap.py --model tiny     # the tiny random model
    .venv/bin/python benchmarks/hot_swap.py --merged --skip-restart
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
from pathlib import Path

import openai
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arena.redis_server import start_redis  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.vllm_server import vllm_command  # noqa: E402
from deploy.admin_client import AdminClient  # noqa: E402
from serve.merged_serving import MERGED_KEY, MergedServing  # noqa: E402
from testkit.net import wait_http  # noqa: E402
from testkit.processes import loopback_settings, start_arena, start_gateway, stop_group  # noqa: E402
from testkit.tiny_model import benchmark_model, build_lora_adapter  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
FAILED_BACKOFF_S = 0.1
BASELINE_PROBES = 5  # requests under the load before any swap: what a swap is measured against






class ChatLoad:
    """Client threads streaming chat completions on model="current", one request after the
    other; every result kept as (started, finished, model or None, error or None)."""

    def __init__(self, url: str, clients: int, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.results: list[tuple[float, float, str | None, str | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                stream = client.chat.completions.create(
                    model="current", messages=PROMPT, max_tokens=self.max_tokens,
                    temperature=0.8, stream=True, extra_body={"ignore_eos": True})
                models = {chunk.model for chunk in stream}
                self.results.append((started, time.monotonic(), ",".join(sorted(models)), None))
            except openai.OpenAIError as error:
                self.results.append((started, time.monotonic(), None, repr(error)[:200]))
                time.sleep(FAILED_BACKOFF_S)

    def first_from(self, version: str, after: float, timeout: float = 120) -> float:
        """When the first request begun after `after` and served by `version` finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [r[1] for r in list(self.results) if r[2] == version and r[0] >= after]
            if done:
                return min(done)
            time.sleep(0.005)
        raise RuntimeError(f"no response from {version} within {timeout}s")

    def failed_between(self, start: float, end: float) -> int:
        return sum(1 for r in list(self.results) if r[3] is not None and start <= r[1] <= end)

    def latencies(self) -> list[float]:
        return [r[1] - r[0] for r in list(self.results) if r[3] is None]

    def __enter__(self) -> ChatLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)


def probe(url: str, max_tokens: int) -> tuple[str | None, float, float]:
    """One streamed request on model="current", sent now: (model, first token at, done at)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model, first = None, 0.0
    for chunk in client.chat.completions.create(
            model="current", messages=PROMPT, max_tokens=max_tokens, temperature=0.8,
            stream=True, extra_body={"ignore_eos": True}):
        if model is None:
            model, first = chunk.model, time.monotonic()
    return model, first, time.monotonic()


def wait_merged(store: redis.Redis, version: str, manager: subprocess.Popen,
                timeout: float = 900) -> float:
    """When `version` is served from merged weights (the manager published its replica)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        merged = MergedServing.from_json(store.get(MERGED_KEY))
        if merged is not None and merged.version == version:
            return time.monotonic()
        if manager.poll() is not None:
            raise RuntimeError("the merged-replica manager exited")
        time.sleep(0.05)
    raise RuntimeError(f"{version} not on merged weights within {timeout}s")


def start_vllm(settings: Settings, model_dir: Path, port: int, log: Path,
               extra: list[str] | None = None) -> subprocess.Popen:
    argv, env = vllm_command(settings, model_dir, port)
    return subprocess.Popen([*argv, *(extra or [])], env=env, stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_model = ROOT / "var/models/base"
    parser.add_argument("--model", default=str(default_model) if (
        default_model / "config.json").exists() else "tiny",
        help="HF folder of the base model, or 'tiny' (default: var/models/base if present)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--settle-s", type=float, default=2.0,
                        help="load time between two swaps")
    parser.add_argument("--skip-restart", action="store_true",
                        help="measure the hot swap only, not the vLLM restart")
    parser.add_argument("--merged", action="store_true",
                        help="run the merged-replica manager: promote, promote, rollback, each "
                             "followed by the move to merged weights")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still run the `finally`

    work = Path(tempfile.mkdtemp(prefix="arena-hotswap-"))
    model_dir, tiny = benchmark_model(args.model, work)
    settings = loopback_settings(work, model_dir, tiny)
    vllm_port, redis_port = settings.vllm_port, settings.redis_port
    vllm_url, gw_url = settings.effective_vllm_urls[0], settings.gateway_url
    token = settings.admin_token.get_secret_value()
    imports = settings.data_dir / "imports"  # an import root: the admin API registers from it
    adapters = [build_lora_adapter(model_dir, imports / f"lora{i}", seed=i) for i in (1, 2, 3)]
    vllm_log = work / "vllm.log"
    procs: list[subprocess.Popen] = [start_redis(redis_port, work / "redis", "everysec")]
    figures: dict = {"model": str(model_dir), "clients": args.clients,
                     "max_tokens": args.max_tokens}
    try:
        t0 = time.monotonic()
        vllm = start_vllm(settings, model_dir, vllm_port, vllm_log)
        procs.append(vllm)
        wait_http(f"{vllm_url}/health", settings.vllm_start_timeout_s, vllm)
        figures["vllm_cold_start_s"] = time.monotonic() - t0
        procs.append(start_gateway(settings, work / "gateway.log"))
        wait_http(f"{gw_url}/livez", 60, procs[-1])
        store = redis.Redis(port=redis_port)
        manager = None
        if args.merged:
            manager = start_arena(settings, work / "merged.log", "merged-replica")
            procs.append(manager)

        admin = AdminClient(gw_url, token, actor="benchmark")
        versions = [admin.register(path)["id"] for path in adapters[:2]]
        warm = openai.OpenAI(base_url=f"{gw_url}/v1", api_key="unused", max_retries=0)
        for version in ["base", *versions]:  # candidates have served battles before a promote
            warm.chat.completions.create(model=version, messages=PROMPT, max_tokens=4)

        plan = [("promote", versions[i % 2]) for i in range(args.swaps)]
        if manager is not None:
            plan = [("promote", versions[0]), ("promote", versions[1]),
                    ("rollback", versions[0])]
        swaps = []
        with ChatLoad(gw_url, args.clients, args.max_tokens) as load:
            time.sleep(args.settle_s)
            # The baseline: the same request under the same load, no swap anywhere near.
            baseline = []
            for _ in range(BASELINE_PROBES):
                sent = time.monotonic()
                _, token_at, done_at = probe(gw_url, args.max_tokens)
                baseline.append((token_at - sent, done_at - sent))
            figures["baseline_first_token_s"] = statistics.median(b[0] for b in baseline)
            figures["baseline_response_s"] = statistics.median(b[1] for b in baseline)
            for i, (action, new) in enumerate(plan):
                called = time.monotonic()
                result = admin.promote(new) if action == "promote" else admin.rollback()
                returned = time.monotonic()
                model, token_at, done_at = probe(gw_url, args.max_tokens)
                assert model == new, f"a request sent after the {action} got {model}"
                busy_first = load.first_from(new, after=called)
                swap = {"action": action, "to": new, "from": result["before"]["current"],
                        "promote_call_s": returned - called,
                        "to_first_token_s": token_at - called,
                        "to_first_response_s": done_at - called,
                        "busy_clients_first_response_s": busy_first - called}
                if manager is not None:  # consolidate: the move to merged weights
                    swap["to_merged_s"] = wait_merged(store, new, manager) - called
                    model, token_at, done_at = probe(gw_url, args.max_tokens)
                    assert model == new, f"after the move to merged weights: {model}"
                time.sleep(args.settle_s)
                swap["failed"] = load.failed_between(called, time.monotonic())
                swaps.append(swap)
                print(f"swap {i + 1}: {swaps[-1]}", flush=True)
            figures["swaps"] = swaps
            figures["request_latency_p50_s"] = statistics.median(load.latencies())
            figures["requests_total_during_swaps"] = len(load.results)
            figures["failed_total_during_swaps"] = sum(1 for r in load.results if r[3])
            figures["served"] = sorted({r[2] for r in load.results if r[2]})
            if not args.skip_restart:
                # the alternative: restart the server with the new weights, same load
                stopped_at = time.monotonic()
                stop_group(vllm)
                vllm = start_vllm(settings, model_dir, vllm_port, vllm_log,
                                  ["--lora-modules", f"policy-new={adapters[2]}"])
                procs.append(vllm)
                wait_http(f"{vllm_url}/health", settings.vllm_start_timeout_s, vllm)
                direct = openai.OpenAI(base_url=f"{vllm_url}/v1", api_key="unused",
                                       max_retries=0)
                direct.chat.completions.create(model="policy-new", messages=PROMPT,
                                               max_tokens=4)
                ready_at = time.monotonic()
                recovered_at = load.first_from(swaps[-1]["to"], after=ready_at)
                figures["restart"] = {"to_first_response_s": ready_at - stopped_at,
                                      "gateway_recovered_s": recovered_at - stopped_at,
                                      "failed": load.failed_between(stopped_at, recovered_at)}
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    report(figures)
    print(f"logs: {vllm_log}, {work / 'gateway.log'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def report(figures: dict) -> None:
    """Add the summary (median and max over the swaps) to `figures` and print it."""
    swaps = figures["swaps"]
    summary: dict[str, float] = {}
    print(f"\nhot swap on {Path(figures['model']).name}, {figures['clients']} clients, "
          f"{figures['max_tokens']} tokens/request, request p50 "
          f"{figures['request_latency_p50_s']:.3f} s under load")
    print(f"  {'':<34}{'median':>10}{'max':>10}")
    if "baseline_first_token_s" in figures:
        print(f"  baseline, the same request under the same load with no swap: first token "
              f"{figures['baseline_first_token_s']:.3f} s, whole answer "
              f"{figures['baseline_response_s']:.3f} s (median of {BASELINE_PROBES})")
    for key, label in (("promote_call_s", "promote call (load + flip)"),
                       ("to_first_token_s", "promote -> first token, new"),
                       ("to_first_response_s", "promote -> whole response, new"),
                       ("busy_clients_first_response_s", "  (looping clients' first new)")):
        values = [s[key] for s in swaps]
        summary[f"{key}_median"], summary[f"{key}_max"] = statistics.median(values), max(values)
        print(f"  {label:<34}{summary[f'{key}_median']:>9.3f}s{summary[f'{key}_max']:>9.3f}s")
    if all("to_merged_s" in s for s in swaps):
        values = [s["to_merged_s"] for s in swaps]
        summary["to_merged_s_median"], summary["to_merged_s_max"] = (statistics.median(values),
                                                                     max(values))
        print(f"  {'-> served from merged weights':<34}{summary['to_merged_s_median']:>9.1f}s"
              f"{summary['to_merged_s_max']:>9.1f}s   ({', '.join(s['action'] for s in swaps)})")
    summary["failed_during_swaps"] = figures["failed_total_during_swaps"]
    figures["summary"] = summary
    print(f"  failed requests: {figures['failed_total_during_swaps']} of "
          f"{figures['requests_total_during_swaps']} ({len(swaps)} swaps)")
    if "restart" in figures:
        restart = figures["restart"]
        print(f"restart vLLM with the new weights: {restart['to_first_response_s']:.1f} s to "
              f"the first answer, gateway serving again after {restart['gateway_recovered_s']:.1f}"
              f" s, {restart['failed']} failed requests (first cold start "
              f"{figures['vllm_cold_start_s']:.1f} s)")

if __name__ == "__main__":
    main()
