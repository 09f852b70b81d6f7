"""Benchmark: how well does the reward model learn what the crowd prefers, and how fast?

Reads the archived votes of a data dir (a crowd run: `arena simulate --judge J`), trains the
reward model of two variants on the same train/held-out split (hash of the vote id) and
prints, side by side:
    held-out accuracy against the crowd's votes (decisive ones; the crowd flips 10 %)
    held-out accuracy against the judge's own noise-free verdicts (the property it prefers)
    training accuracy and the wall time of the training (model load to normalised scores)

    the correlation of the reward with the answer's length (tokens) over the held-out answers,
    the share of held-out content ties (the judge's verdict, lengths >10 % apart) where the RM
    prefers the longer answer (0.5: length-blind), and γ where the variant has length control

Variants: `probe` (the `cpu` preset's reward model: heads on the frozen base's layer-12
states), `probe-lc` (the same with length control, the `cpu-length-control` preset) and `lora`
(the earlier `cpu` reward model: LoRA on the top 10 layers, last-token + token-sum heads, one
epoch), all from learner/presets.py.

`--relabel J` re-judges the archived answers with judge J (seeded) instead of using the
crowd's votes: the same answers under another crowd, e.g. `key_noun_then_longer_noisy`, a
crowd swayed by length where the content ties, to see whether length control keeps the RM
from paying for length while it still learns the content (`--judge key_noun`).

    ARENA_DATA_DIR=/tmp/smol/var .venv/bin/python benchmarks/reward_model_fit.py \\
        --judge key_noun --eval-percent 30            # SmolLM2, 400 votes: ~7 min, alone
    ARENA_DATA_DIR=/tmp/loop4/var .venv/bin/python benchmarks/reward_model_fit.py \\
        --judge key_noun --relabel key_noun_then_longer_noisy --variants probe,probe-lc
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

from core.settings import Settings  # noqa: E402
from crowd.judges import get_judge, shorter  # noqa: E402
from learner import reward_model as rm  # noqa: E402
from learner.presets import get_preset  # noqa: E402
from learner.vote_source import vote_source  # noqa: E402

PROBE = get_preset("cpu").reward
LORA = replace(PROBE, lr=2e-4, epochs=1, lora_layers=10, readout_layer=None, pooling="sum",
               last_token=True, head_l2=0.0, lora_rank=16, lora_alpha=32)
VARIANTS = {"probe": PROBE, "probe-lc": get_preset("cpu-length-control").reward, "lora": LORA}
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


def relabel(votes: list, judge_name: str, seed: int = 0) -> list:
    """The same answers, judged by `judge_name` instead of the crowd."""
    judge, rng = get_judge(judge_name), random.Random(seed)
    return [replace(v, winner=judge(v.conversation_a, v.answer_a, v.answer_b, rng))
            for v in votes]


@torch.no_grad()
def longer_preferred(result: rm.RewardTrainResult, held_out: list, preset,
                     content_judge: str) -> tuple[float | None, int]:
    """On held-out pairs the content judge calls a tie whose lengths differ (SHORTER_MARGIN),
    the share where the RM scores the longer answer higher: 0.5 = length-blind."""
    judge, rng = get_judge(content_judge), random.Random(0)
    ties = [v for v in held_out if judge(v.conversation_a, v.answer_a, v.answer_b, rng) == "tie"
            and shorter(v.conversation_a, v.answer_a, v.answer_b, rng) in ("a", "b")]
    if not ties:
        return None, 0
    pairs, _ = rm.votes_to_pairs([replace(v, winner="a") for v in ties], result.tokenizer, preset)
    pad_id = result.tokenizer.pad_token_id
    deltas = torch.cat([rm.pair_deltas(result.model, pairs[i:i + 16], pad_id)
                        for i in range(0, len(pairs), 16)])  # r_a − r_b
    a_longer = torch.tensor([len(v.answer_a.strip()) > len(v.answer_b.strip()) for v in ties])
    return ((deltas.cpu() > 0) == a_longer).float().mean().item(), len(ties)


@torch.no_grad()
def length_correlation(result: rm.RewardTrainResult, held_out: list, preset) -> float:
    """Pearson correlation of the normalised reward with the answer's length in tokens, over
    both answers of each held-out vote."""
    pairs, _ = rm.votes_to_pairs(held_out, result.tokenizer, preset)
    pad_id = result.tokenizer.pad_token_id
    scores = torch.cat([rm.pair_rewards(result.model, pairs[i:i + 16], pad_id).split(
        len(pairs[i:i + 16]))[side] for i in range(0, len(pairs), 16) for side in (0, 1)])
    lengths = torch.tensor([float(len(p.answer_a if side == 0 else p.answer_b))
                            for i in range(0, len(pairs), 16) for side in (0, 1)
                            for p in pairs[i:i + 16]])
    return torch.corrcoef(torch.stack([scores.float().cpu(), lengths]))[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--judge", default="key_noun", help="the crowd's judge, noise-free")
    parser.add_argument("--eval-percent", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="probe,lora")
    parser.add_argument("--relabel", default=None,
                        help="judge the archived answers with this judge instead of the crowd")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    votes = vote_source(settings).votes()
    if args.relabel:
        votes = relabel(votes, args.relabel)
    print(f"{len(votes)} votes from {settings.data_dir}"
          f"{f', relabelled by {args.relabel}' if args.relabel else ''}, judge {args.judge}, "
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
        gamma = result.metrics.get("length_weight")
        rows[name] = {"crowd": result.metrics["heldout_accuracy"], "judge": judged,
                      "n_judge": n_judged, "train": result.metrics["train_accuracy"],
                      "n_train": result.metrics["n_train"], "seconds": seconds,
                      "length_corr": length_correlation(result, held_out, preset)}
        rows[name]["longer"], n_ties = longer_preferred(result, held_out, preset, args.judge)
        print(f"{name:8s} held-out vs crowd {rows[name]['crowd']:.3f}  vs judge {judged:.3f} "
              f"(n={n_judged})  train {rows[name]['train']:.3f} (n={rows[name]['n_train']})  "
              f"corr(r, length) {rows[name]['length_corr']:+.3f}  longer preferred on "
              f"content ties {rows[name]['longer'] or float('nan'):.3f} (n={n_ties})"
              f"{f'  γ {gamma:+.3f}' if gamma is not None else ''}  {seconds:.0f} s",
              flush=True)
    if {"probe", "lora"} <= rows.keys():
        p, q = rows["probe"], rows["lora"]
        print(f"probe vs lora: judge accuracy {p['judge']:.3f} vs {q['judge']:.3f}, "
              f"time {p['seconds']:.0f} s vs {q['seconds']:.0f} s "
              f"({q['seconds'] / p['seconds']:.1f}x faster)")

    if {"probe", "probe-lc"} <= rows.keys():
        p, q = rows["probe"], rows["probe-lc"]
        print(f"length control: longer preferred on content ties {p['longer'] or float('nan'):.3f}"
              f" -> {q['longer'] or float('nan'):.3f}, corr(r, length) {p['length_corr']:+.3f} ->"
              f" {q['length_corr']:+.3f}, judge accuracy {p['judge']:.3f} -> {q['judge']:.3f}")


if __name__ == "__main__":
    main()
