"""PPO throughput: our learner vs TRL's PPOTrainer on the same model, prompts, batch and answer
length, in the same run; plus chat latency (p50) on vLLM while our PPO trains vs idle.

    .venv/bin/python benchmarks/ppo_throughput.py                    # SmolLM2 (var/models/base)
    .venv/bin/python benchmarks/ppo_throughput.py --model tiny --steps 2 --answer-tokens 16
    .venv/bin/python benchmarks/ppo_throughput.py --start-vllm --latency   # + vLLM rollouts

What runs (one fixed config: batch 8 prompts, 48-token answers, 2 PPO epochs × 2 minibatches,
temperature 1, `--steps` PPO steps after one warm-up step):

* ours-transformers: learner.policy_trainer.train_policy, LoRA policy, value head on the
  policy trunk, reference = adapter disabled, rollouts with transformers `generate`;
* ours-vllm (with --start-vllm or --vllm-url): the same with rollouts on a vLLM server
  (adapter hot-loaded under a fresh name after every update);
* trl: trl==1.12.0 `trl.experimental.ppo.PPOTrainer` (the last release with PPO), installed by
  this script into `.bench-venv-trl` (a venv that shares this venv's torch / transformers
  through a .pth file and adds trl + datasets), run in a subprocess: full policy, separate
  reference copy, separate reward and (fully trainable) value models, as TRL does by default.

Both sides use an untrained reward model on the same base (throughput does not depend on
what it scores). samples/s = answers trained on per second of PPO steps (rollout + scoring +
updates, model loading excluded); tokens/s = answer tokens (up to and including eos) per
second. Results print as a table and go to --json (default benchmarks/out/ppo_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRL_VERSION = "1.12.0"
TRL_VENV = ROOT / ".bench-venv-trl"
WARMUP_STEPS = 1
LATENCY_MAX_TOKENS = 32
LATENCY_PROMPT = "Give me three tips for better sleep."


# --- configuration shared by both sides ---------------------------------------------------
def bench_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="base",
                   help="'base' (settings' base model, SmolLM2), 'tiny', or an HF folder")
    p.add_argument("--steps", type=int, default=4, help="timed PPO steps (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="ours: bf16 autocast of the trunk where the CPU has bf16 (auto)")
    p.add_argument("--vllm-url", default=None, help="use this vLLM (serving the same model)")
    p.add_argument("--start-vllm", action="store_true", help="start a vLLM server on --model")
    p.add_argument("--latency", action="store_true",
                   help="chat p50 on vLLM idle vs while our PPO trains (needs vLLM)")
    p.add_argument("--latency-requests", type=int, default=10)
    p.add_argument("--latency-steps", type=int, default=2, help="timed PPO steps meanwhile")
    p.add_argument("--latency-interval", type=float, default=3.0,
                   help="seconds between chat requests of the latency probe")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-bf16", action="store_true",
                   help="also run TRL with bf16=True (mixed precision on CPU)")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "ppo_throughput.json")
    # internal: the TRL side, run by the TRL venv's python
    p.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def bench_prompts(n: int) -> list[str]:
    """The same prompts for both sides: the first n shipped prompts, cycled."""
    lines = [line.strip() for line in
             (ROOT / "learner" / "data" / "prompts.txt").read_text().splitlines() if line.strip()]
    return [lines[i % len(lines)] for i in range(n)]


def resolve_model(name: str, work: Path) -> Path:
    if name == "tiny":
        from testkit.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny")
    if name == "base":
        from core.settings import Settings

        path = Settings().base_model_path
        if not (path / "config.json").is_file():
            sys.exit(f"no base model at {path}: run `arena model prepare` (or use --model tiny)")
        return path
    return Path(name)


# --- ours -----------------------------------------------------------------------------------
def run_ours(model_dir: Path, args: argparse.Namespace, backend: str, vllm_url: str | None,
             work: Path) -> dict:
    import torch

    from learner.policy_trainer import train_policy
    from learner.presets import PPOPreset, RewardPreset
    from learner.prompt_pool import PromptPool
    from learner.reward_model import build_reward_model
    from learner.rollout import TransformersRollout, VLLMRollout

    torch.set_num_threads(args.threads)
    preset = PPOPreset(steps=WARMUP_STEPS + args.steps, rollout_batch=args.batch,
                       minibatch_size=args.batch // args.minibatches, ppo_epochs=args.ppo_epochs,
                       max_new_tokens=args.answer_tokens, temperature=1.0, eval_prompts=1,
                       checkpoint_every=0, lr=1e-5, precision=args.precision)
    reward_model, _ = build_reward_model(
        model_dir, replace(RewardPreset(), lora_rank=8, precision=args.precision))
    reward_model.requires_grad_(False)
    prompts = bench_prompts(args.batch * (WARMUP_STEPS + args.steps))

    def factory(tok):
        if backend == "vllm":
            return VLLMRollout(vllm_url, work / "adapters", tok.eos_token_id, args.answer_tokens,
                               1.0, tokenizer=tok)
        return TransformersRollout(tok.eos_token_id, tok.pad_token_id, args.answer_tokens, 1.0,
                                   args.precision)

    result = train_policy(model_dir, preset, reward_model.score, PromptPool(shipped=prompts),
                          factory)
    timed = result.history[WARMUP_STEPS:]
    seconds = sum(row["step_s"] for row in timed)
    samples = len(timed) * args.batch
    tokens = sum(row["answer_tokens"] * args.batch for row in timed)
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "samples": samples,
            "generate_share": sum(r["generate_s"] for r in timed) / seconds,
            "score_share": sum(r["score_s"] for r in timed) / seconds,
            "update_share": sum(r["update_s"] for r in timed) / seconds,
            "mean_answer_tokens": tokens / samples}


# --- TRL ------------------------------------------------------------------------------------
def ensure_trl_venv() -> Path:
    """A venv with trl==1.12.0 that reuses this venv's torch/transformers (a .pth file)."""
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing trl=={TRL_VERSION} into {TRL_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    import site as our_site

    (Path(site) / "_arena_main_venv.pth").write_text(our_site.getsitepackages()[0] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    subprocess.run(check, check=True)
    return python


def run_trl(model_dir: Path, args: argparse.Namespace, work: Path, bf16: bool = False) -> dict:
    python = ensure_trl_venv()
    spec = work / "trl-spec.json"
    spec.write_text(json.dumps({
        "bf16": bf16,
        "model_dir": str(model_dir), "steps": args.steps, "batch": args.batch,
        "answer_tokens": args.answer_tokens, "ppo_epochs": args.ppo_epochs,
        "minibatches": args.minibatches, "threads": args.threads, "out": str(work / "trl-out"),
        "prompts": bench_prompts(args.batch * (WARMUP_STEPS + args.steps)),
    }))
    proc = subprocess.run([str(python), __file__, "--trl-worker", str(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"TRL run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")


def trl_worker(spec_path: Path) -> None:
    """Runs inside the TRL venv: TRL's PPO on the same model, prompts, batch, answer length."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    model_dir = spec["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    eos = tok.eos_token_id

    # Count the answer tokens TRL generates (up to and including eos), as for ours.
    counted = {"tokens": 0}
    original = trl_ppo.batch_generation

    def counting_generation(model, queries, batch, pad_id, config):
        query_responses, logits = original(model, queries, batch, pad_id, config)
        responses = query_responses[:, queries.shape[1]:]
        for row in responses.tolist():
            counted["tokens"] += row.index(eos) + 1 if eos in row else len(row)
        return query_responses, logits

    trl_ppo.batch_generation = counting_generation

    def encode(prompt: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    dataset = Dataset.from_dict({"input_ids": [encode(p) for p in spec["prompts"]]})
    load = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, *a, **k):
            self.marks.append((time.perf_counter(), 0))

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), counted["tokens"]))

    times = StepTimes()
    batch = spec["batch"]
    config = PPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=spec["minibatches"], num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=batch * (WARMUP_STEPS + spec["steps"]),
        response_length=spec["answer_tokens"],
        temperature=1.0, stop_token="eos", local_rollout_forward_batch_size=batch,
        learning_rate=1e-5, kl_coef=0.05, use_cpu=True, bf16=spec["bf16"], report_to="none",
        save_strategy="no", logging_steps=1, num_sample_generations=0, seed=0,
    )
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=dataset,
                         callbacks=[times])
    trainer.train()
    (t0, k0), (t1, k1) = times.marks[WARMUP_STEPS], times.marks[-1]
    steps = len(times.marks) - 1 - WARMUP_STEPS
    seconds = t1 - t0
    print("RESULT " + json.dumps({
        "samples_per_s": steps * batch / seconds, "tokens_per_s": (k1 - k0) / seconds,
        "seconds": seconds, "samples": steps * batch,
        "mean_answer_tokens": (k1 - k0) / (steps * batch)}), flush=True)


# --- vLLM and latency -----------------------------------------------------------------------
def start_vllm(model_dir: Path, work: Path):
    import httpx

    from core.settings import Settings
    from core.vllm_server import vllm_command

    port = 8190
    argv, env = vllm_command(Settings(_env_file=None, vllm_kvcache_gib=2), model_dir, port)
    log = (work / "vllm.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"vLLM exited: see {work / 'vllm.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit("vLLM did not start in 300 s")


def chat_latencies(url: str, n: int, interval_s: float,
                   stop: threading.Event | None = None) -> list[float]:
    """One chat request every `interval_s` (a light, steady user load), latency of each."""
    import httpx

    out = []
    with httpx.Client(timeout=120) as client:
        while len(out) < n and not (stop is not None and stop.is_set()):
            t = time.perf_counter()
            r = client.post(f"{url}/v1/chat/completions", json={
                "model": "base", "max_tokens": LATENCY_MAX_TOKENS, "temperature": 0.8,
                "messages": [{"role": "user", "content": LATENCY_PROMPT}]})
            r.raise_for_status()
            out.append(time.perf_counter() - t)
            time.sleep(max(0.0, interval_s - (time.perf_counter() - t)))
    return out


# --- main -----------------------------------------------------------------------------------
def main() -> None:
    args = bench_args()
    if args.trl_worker is not None:
        trl_worker(args.trl_worker)
        return
    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    model_dir = resolve_model(args.model, work)
    print(f"model {model_dir}, batch {args.batch}, answers ≤ {args.answer_tokens} tokens, "
          f"{args.steps} timed steps, {args.threads} threads", flush=True)
    vllm_proc, vllm_url = None, args.vllm_url
    if args.start_vllm:
        vllm_proc, vllm_url = start_vllm(model_dir, work)
    results: dict[str, dict] = {}
    try:
        if not args.skip_ours:
            results["ours-transformers"] = run_ours(model_dir, args, "transformers", None, work)
            print("ours-transformers", results["ours-transformers"], flush=True)
            if vllm_url:
                results["ours-vllm"] = run_ours(model_dir, args, "vllm", vllm_url, work)
                print("ours-vllm", results["ours-vllm"], flush=True)
        if not args.skip_trl:
            results["trl"] = run_trl(model_dir, args, work)
            print("trl", results["trl"], flush=True)
            if args.trl_bf16:
                results["trl-bf16"] = run_trl(model_dir, args, work, bf16=True)
                print("trl-bf16", results["trl-bf16"], flush=True)
        if args.latency and vllm_url:
            # Training as the learner worker runs it: `learner_threads` threads, `learner_nice`.
            from core.settings import Settings

            settings = Settings()
            idle = chat_latencies(vllm_url, args.latency_requests, args.latency_interval)
            stop, during = threading.Event(), []
            prober = threading.Thread(target=lambda: during.extend(
                chat_latencies(vllm_url, 10_000, args.latency_interval, stop)), daemon=True)
            os.nice(settings.learner_nice)  # last phase: nothing else runs after it
            trained = argparse.Namespace(**{**vars(args), "threads": settings.learner_threads,
                                            "steps": args.latency_steps})
            prober.start()
            during_training = run_ours(model_dir, trained, "vllm", vllm_url, work)
            stop.set()
            prober.join()
            results["chat_latency"] = {
                "p50_idle_s": statistics.median(idle),
                "p50_training_s": statistics.median(during),
                "n_idle": len(idle), "n_training": len(during),
                "learner_threads": settings.learner_threads,
                "learner_nice": settings.learner_nice,
                "ppo_samples_per_s_meanwhile": during_training["samples_per_s"]}
            print("chat latency", results["chat_latency"], flush=True)
    finally:
        if vllm_proc is not None:
            os.killpg(vllm_proc.pid, signal.SIGTERM)  # its own session: the whole group
            try:
                vllm_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(vllm_proc.pid, signal.SIGKILL)
                vllm_proc.wait()

    print(f"\n{'run':<20}{'samples/s':>12}{'tokens/s':>12}{'answer tok':>12}")
    for name in ("ours-transformers", "ours-vllm", "trl", "trl-bf16"):
        if name in results:
            r = results[name]
            print(f"{name:<20}{r['samples_per_s']:>12.3f}{r['tokens_per_s']:>12.1f}"
                  f"{r['mean_answer_tokens']:>12.1f}")
    if "trl" in results:
        best = max((results[k]["samples_per_s"], k) for k in ("ours-transformers", "ours-vllm")
                   if k in results) if not args.skip_ours else None
        if best:
            results["ratio_vs_trl"] = best[0] / results["trl"]["samples_per_s"]
            print(f"ratio ({best[1]} / trl, samples/s): {results['ratio_vs_trl']:.2f} "
                  "(target ≥ 2)")
            if "trl-bf16" in results:
                results["ratio_vs_trl_bf16"] = best[0] / results["trl-bf16"]["samples_per_s"]
                print(f"ratio ({best[1]} / trl-bf16): {results['ratio_vs_trl_bf16']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                     "model_dir": str(model_dir), "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
