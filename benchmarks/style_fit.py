"""Benchmark: the style-controlled Bradley-Terry fit (elo/style_control.py) on 1M votes.

Synthetic votes over 8 versions whose answers differ in length, markdown headers, list items
and bold text, from voters who like longer, more formatted answers (true style weights known)
on top of true quality differences. Printed, side by side in one run:
    ours      aggregate into style cells + fit + `--rounds` bootstrap rounds (target <= 10 s)
    baseline  the plain Bradley-Terry fit + bootstrap on the same votes (elo/bradley_terry.py)
and the ratio, plus how close each fit's ratings are to the true quality (the plain fit
absorbs style into the ratings; the controlled one should not).

    .venv/bin/python benchmarks/style_fit.py              # 1M votes, 100 rounds
    .venv/bin/python benchmarks/style_fit.py --votes 200000 --rounds 20
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from elo.bradley_terry import bootstrap, count_pairs_coded
from elo.rating_scale import BASE, SCALE
from elo.style_control import STYLE_FEATURES, bootstrap_style, normalised_difference, style_cells

N_MODELS = 8
TRUE_STYLE_WEIGHTS = np.array([1.0, 0.3, 0.3, 0.2])  # log-odds per unit normalised difference


def synthetic_votes(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    quality = rng.normal(0, 0.5, N_MODELS)
    quality -= quality[0]  # the anchor, "base", at 0
    # Each version's style habits: mean words, and rates of headers / list items / bold.
    verbosity = rng.uniform(40, 200, N_MODELS)
    formatting = rng.uniform(0, 3, (N_MODELS, 3))
    a = rng.integers(0, N_MODELS, n)
    b = (a + rng.integers(1, N_MODELS, n)) % N_MODELS

    def answers(model: np.ndarray) -> np.ndarray:
        words = rng.poisson(verbosity[model])
        return np.column_stack([words, *(rng.poisson(formatting[model, k]) for k in range(3))])

    diff = normalised_difference(answers(a), answers(b))
    eta = quality[a] - quality[b] + diff @ TRUE_STYLE_WEIGHTS
    u = rng.random(n)
    p_a = 1 / (1 + np.exp(-eta))
    tie = rng.random(n) < 0.1
    score = np.where(tie, 0.5, (u < p_a).astype(float))
    return a, b, score, diff, quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = ["base"] + [f"policy-v{i}" for i in range(1, N_MODELS)]
    a, b, score, diff, quality = synthetic_votes(args.votes, args.seed)
    truth = quality * SCALE / math.log(BASE) + 1000.0

    started = time.perf_counter()
    cells = style_cells(a, b, score, diff, models)
    styled = bootstrap_style(cells, rounds=args.rounds)
    ours_s = time.perf_counter() - started

    started = time.perf_counter()
    plain = bootstrap(count_pairs_coded(a, b, score, N_MODELS, models), rounds=args.rounds)
    baseline_s = time.perf_counter() - started

    def error(ratings: dict[str, float]) -> float:
        return float(np.mean(np.abs(np.array([ratings[m] for m in models]) - truth)))

    print(f"{args.votes:,} votes, {N_MODELS} versions, {args.rounds} bootstrap rounds; "
          f"{len(cells.count):,} style cells")
    print(f"style-controlled fit + bootstrap: {ours_s:6.2f} s   (target <= 10 s)")
    print(f"plain fit + bootstrap (baseline): {baseline_s:6.2f} s   "
          f"ratio {ours_s / baseline_s:.1f}x")
    print(f"mean |rating - true quality|: controlled {error(styled.ratings):6.1f}  "
          f"plain {error(plain.ratings):6.1f} rating points")
    scaled_truth = TRUE_STYLE_WEIGHTS * cells.rms  # per rms unit, what the fit reports
    for feature, true_w in zip(STYLE_FEATURES, scaled_truth, strict=True):
        low, high = styled.coefficient_ci[feature]
        print(f"  style weight {feature:10s} {styled.coefficients[feature]:+.3f} "
              f"[{low:+.3f}, {high:+.3f}]  true {true_w:+.3f}")


if __name__ == "__main__":
    main()
