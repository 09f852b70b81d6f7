"""The learner on 1 and on 2 training processes (issue 15: Accelerate DDP, gloo on CPUs).

Each configuration runs the reward-model phase and then the PPO phase exactly as the worker
runs them with ARENA_LEARNER_PROCESSES (learner.launch.run_launched), on the same votes
(the hidden rule "the answer that says banana wins", testkit.hidden_rule_votes), the same
seeds and preset, side by side in one run:

    1 process × 1 torch thread    the baseline (the worker's default)
    1 process × 2 torch threads   the same cores as 2 processes, used by one
    2 processes × 1 thread each   data-parallel (DDP)
    the same, sharded             FSDP2 (configs/accelerate/fsdp.yaml): the weights sharded

Printed per configuration: the reward model's held-out accuracy and loss and its seconds; PPO's
evaluation reward before → after, KL, seconds and answers per second; the largest gradient
difference between the ranks; and the speed ratio against the baseline.

    .venv/bin/python benchmarks/data_parallel.py                   # SmolLM2, `cpu` preset
    .venv/bin/python benchmarks/data_parallel.py --model tiny      # tiny model, `tiny` preset

SmolLM2 (PPO cut to --ppo-steps, default 4): ~12 min on 2 cores; tiny: ~2 min. Run alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arena.redis_server import start_redis  # noqa: E402
from core.settings import Settings  # noqa: E402
from learner.launch import run_launched  # noqa: E402
from learner.prompt_pool import load_shipped_prompts  # noqa: E402
from learner.vote_source import write_jsonl  # noqa: E402
from testkit.hidden_rule_votes import hidden_rule_votes, sft_tiny_base  # noqa: E402
from testkit.net import free_port  # noqa: E402
from testkit.processes import stop_group  # noqa: E402
from testkit.tiny_model import benchmark_model  # noqa: E402

CONFIGS = ((1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True))  # (processes,
# torch threads each, weights sharded)
FSDP_CONFIG = ROOT / "configs/accelerate/fsdp.yaml"
N_VOTES = 400


def run(settings: Settings, votes: Path, name: str) -> dict:
    started = time.monotonic()
    rm = run_launched(settings, "reward", f"{name}-rm", votes_jsonl=votes)
    rm_s = time.monotonic() - started
    policy = run_launched(settings, "policy", f"{name}-policy", rm_version=rm["version"],
                          parent="base", votes_jsonl=votes)
    return {"rm": rm["metrics"], "rm_s": rm_s, "ppo": policy["metrics"],
            "ppo_s": time.monotonic() - started - rm_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="var/models/base",
                        help="HF folder of the base model, or 'tiny'")
    parser.add_argument("--ppo-steps", type=int, default=None,
                        help="PPO steps (default: 4 on SmolLM2, the preset's on tiny)")
    parser.add_argument("--votes", type=int, default=N_VOTES)
    parser.add_argument("--seeds", type=int, default=1,
                        help="vote sets (seeds 1..N): PPO's gain is noisy, compare it over several")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        work = Path(tmp)
        model_dir, tiny = benchmark_model(args.model, work)
        prompts = load_shipped_prompts()
        # PPO on the tiny model starts from its SFT (test_learner_training.py); the reward
        # model reads the random tiny base, as in the learner tests.
        policy_base = sft_tiny_base(model_dir, work / "tiny-sft", prompts) if tiny else model_dir
        steps = args.ppo_steps or (None if tiny else 4)
        redis_port = free_port()
        redis = start_redis(redis_port, work / "redis")
        results: dict[int, dict[str, dict]] = {}
        try:
            for seed in range(1, args.seeds + 1):
                votes = write_jsonl(work / f"votes-{seed}.jsonl",
                                    hidden_rule_votes(args.votes, prompts, seed=seed))
                results[seed] = {}
                for processes, threads, sharded in CONFIGS:
                    name = f"s{seed}{key(processes, threads, sharded)}"
                    settings = Settings(
                        _env_file=None, data_dir=work / name, redis_port=redis_port,
                        base_model=policy_base, learner_reward_base_model=model_dir,
                        learner_preset="tiny" if tiny else "cpu", learner_processes=processes,
                        learner_threads=threads, learner_rollout="transformers",
                        learner_user_prompts=0, learner_ppo_steps=steps, learner_nice=0,
                        learner_accelerate_config=FSDP_CONFIG if sharded else None,
                        admin_token="bench", session_secret="bench")
                    print(f"votes seed {seed}: {label(processes, threads, sharded)} …",
                          flush=True)
                    results[seed][key(processes, threads, sharded)] = run(settings, votes, name)
        finally:
            stop_group(redis)

    first = results[1]
    base = first["p1t1"]
    print(f"\n{args.votes} hidden-rule votes (seed 1), model {args.model}, PPO steps "
          f"{base['ppo']['steps']}\n")
    print(f"{'':27} {'RM acc':>7} {'RM loss':>8} {'RM s':>6} {'ratio':>6}  "
          f"{'PPO reward':>15} {'KL':>5} {'PPO s':>6} {'ans/s':>6} {'ratio':>6} {'grad diff':>9}")
    for (processes, threads, sharded), r in zip(CONFIGS, first.values(), strict=True):
        rm, ppo = r["rm"], r["ppo"]
        spread = "—" if sharded else f"{max(rm['grad_spread'], ppo['grad_spread_max']):.1e}"
        print(f"{label(processes, threads, sharded)}     "
              f"{rm['heldout_accuracy']:7.3f} {rm['heldout_loss']:8.4f} {r['rm_s']:6.1f} "
              f"{base['rm_s'] / r['rm_s']:5.2f}x  "
              f"{ppo['reward_start']:+6.3f} → {ppo['reward_end']:+6.3f} {ppo['kl_end']:5.2f} "
              f"{r['ppo_s']:6.1f} {ppo['samples_per_s']:6.2f} {base['ppo_s'] / r['ppo_s']:5.2f}x "
              f"{spread:>9}")
    print("\nratio: the baseline's wall time (1 process, 1 thread) over this one's, launch "
          "included; grad diff: max |g_rank − g_0| after DDP's all-reduce (0 on 1 process; "
          "— sharded: one copy of each gradient).")
    if args.seeds > 1:
        print("\nPPO eval reward gain (end − start) per vote seed, and RM held-out loss:")
        for processes, threads, sharded in CONFIGS:
            k = key(processes, threads, sharded)
            gains = [results[s][k]["ppo"]["reward_end"] - results[s][k]["ppo"]["reward_start"]
                     for s in results]
            losses = [results[s][k]["rm"]["heldout_loss"] for s in results]
            print(f"{label(processes, threads, sharded)}  gain "
                  + " ".join(f"{g:+.3f}" for g in gains) + f"  mean {sum(gains) / len(gains):+.3f}"
                  + "   RM loss " + " ".join(f"{x:.4f}" for x in losses))


def key(processes: int, threads: int, sharded: bool) -> str:
    return f"p{processes}t{threads}{'fsdp' if sharded else ''}"


def label(processes: int, threads: int, sharded: bool) -> str:
    return (f"{processes} proc × {threads} thread{'s' if threads > 1 else ' '}"
            f"{' FSDP' if sharded else '     '}")

if __name__ == "__main__":
    main()
