"""Benchmark: how well does the reward model learn what the crowd prefers, and how fast?

Reads the archived votes of a data dir (a crowd run: `arena simulate --judge J`), trains the
reward model of two variants on the same train/held-out split (hash of the vote id) and
prints, side by side:
    held-out accuracy against the crowd's votes (decisive ones; the crowd flips 10 %)
    held-out accuracy against the judge's own noise-free verdicts (the property it prefers)
    training accuracy and the wall time of the training (model load to normalised scores)

Variants: `probe` (the `cpu` preset's reward model: heads on the frozen base's layer-12
states) and `lora` (the earlier `cpu` reward model: LoRA on the top 10 layers, last-token +
token-sum heads, one epoch), both from learner/presets.py.

    ARENA_DATA_DIR=/tmp/smol/var .venv/bin/python benchmarks/reward_model_fit.py \\
        --judge key_noun --eval-percent 30            # SmolLM2, 400 votes: ~7 min, alone
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arena.settings import Settings  # noqa: E402
from crowd.judges import get_judge  # noqa: E402
from learner import reward_model as rm  # noqa: E402
from learner.presets import get_preset  # noqa: E402
from learner.votes import vote_source  # noqa: E402

PROBE = get_preset("cpu").reward
LORA = replace(PROBE, lr=2e-4, epochs=1, lora_layers=10, readout_layer=None, pooling="sum",
               last_token=True, head_l2=0.0, lora_rank=16, lora_alpha=32)
VARIANTS = {"probe": PROBE, "lora": LORA}
JUDGE_TARGET = {"a": 1.0, "b": 0.0}


def judge_accuracy(result: rm.RewardTrainResult, held_out: list, judge_name: str,
                   preset) -> tuple[float | None, int]:
    """Share of held-out pairs the judge decides (no noise) that the RM orders the same way:
    the RM's own held-out evaluation, with the judge's verdicts as the targets."""
    judge = get_judge(judge_name)
    rng = random.Random(0)
    pairs, _ = rm.votes_to_pairs(held_out, result.tokenizer, preset)
    judged = [replace(pair, target=JUDGE_TARGET.get(
        judge(v.conversation_a, v.answer_a, v.answer_b, rng), 0.5))
        for pair, v in zip(pairs, held_out, strict=True)]
    metrics = rm.evaluate_pairs(result.model, judged, result.tokenizer.pad_token_id, 16)
    return metrics["accuracy"], sum(p.target != 0.5 for p in judged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--judge", default="key_noun", help="the crowd's judge, noise-free")
    parser.add_argument("--eval-percent", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="probe,lora")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    votes = vote_source(settings).votes()
    print(f"{len(votes)} votes from {settings.data_dir}, judge {args.judge}, "
          f"{args.eval_percent} % held out, {args.threads} threads")
    rows = {}
    for name in args.variants.split(","):
        preset = replace(VARIANTS[name], eval_percent=args.eval_percent, eval_every_steps=0)
        started = time.monotonic()
        result = rm.train_reward_model(votes, settings.base_model_path, preset)
        seconds = time.monotonic() - started
        held_out = [v for v in votes if rm.is_held_out(v.vote_id, args.eval_percent)
                    and v.winner in ("a", "b", "tie")]
        judged, n_judged = judge_accuracy(result, held_out, args.judge, preset)
        rows[name] = {"crowd": result.metrics["heldout_accuracy"], "judge": judged,
                      "n_judge": n_judged, "train": result.metrics["train_accuracy"],
                      "n_train": result.metrics["n_train"], "seconds": seconds}
        print(f"{name:6s} held-out vs crowd {rows[name]['crowd']:.3f}  vs judge {judged:.3f} "
              f"(n={n_judged})  train {rows[name]['train']:.3f} (n={rows[name]['n_train']})  "
              f"{seconds:.0f} s", flush=True)
    if {"probe", "lora"} <= rows.keys():
        p, q = rows["probe"], rows["lora"]
        print(f"probe vs lora: judge accuracy {p['judge']:.3f} vs {q['judge']:.3f}, "
              f"time {p['seconds']:.0f} s vs {q['seconds']:.0f} s "
              f"({q['seconds'] / p['seconds']:.1f}x faster)")


if __name__ == "__main__":
    main()
