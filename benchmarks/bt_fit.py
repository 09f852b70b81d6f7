"""Benchmark: our Bradley-Terry fit + bootstrap vs FastChat's per-vote logistic regression.

Scenario 1 (same synthetic votes for both):
    ours      count_pairs (names) + fit + `--rounds` bootstrap rounds on aggregated counts
    baseline  FastChat's `compute_mle_elo`: per round, resample the individual votes, build a
              (2 * votes) x models design matrix with +log(base) / -log(base) entries (every
              vote twice; a tie is one win each way), fit sklearn LogisticRegression
              (no intercept, no penalty, tol=1e-6), ratings = 400 * coef + 1000, anchored.
Scenario 2: 10M integer-coded votes over 100 versions, count + fit + bootstrap (target <= 2 s).

Usage:
    .venv/bin/python benchmarks/bt_fit.py                       # full run (~4 min baseline)
    .venv/bin/python benchmarks/bt_fit.py --baseline-rounds 5   # extrapolate baseline time

The baseline needs scikit-learn (`pip install scikit-learn`); FastChat's own function is
used when `fastchat` is importable, a faithful re-implementation otherwise.
"""

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from elo import bootstrap, count_pairs, count_pairs_coded, expected_score, fit
from elo.rating_scale import BASE, INITIAL_RATING, SCALE

ANCHOR = "base"
TIE_RATE, BOTH_BAD_RATE = 0.10, 0.05
FASTCHAT_WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def synthetic_codes(
    n_votes: int, n_models: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer-coded votes (idx_a, idx_b, score_a) from Bradley-Terry strengths with ties."""
    rng = np.random.default_rng(seed)
    strength = INITIAL_RATING + rng.normal(0.0, 120.0, n_models)
    strength[0] = INITIAL_RATING  # model 0 is the anchor, "base"
    idx_a = rng.integers(0, n_models, n_votes)
    idx_b = (idx_a + rng.integers(1, n_models, n_votes)) % n_models
    p_a = expected_score(strength[idx_a], strength[idx_b])
    tie = rng.random(n_votes) < TIE_RATE + BOTH_BAD_RATE
    # Decisive votes are drawn so that E[score_a] = p_a: ties do not bias the ratings.
    p_decisive = np.clip(
        (p_a - (TIE_RATE + BOTH_BAD_RATE) / 2) / (1 - TIE_RATE - BOTH_BAD_RATE), 0, 1
    )
    score_a = np.where(tie, 0.5, (rng.random(n_votes) < p_decisive).astype(np.float64))
    return idx_a, idx_b, score_a


def synthetic_votes(
    n_votes: int, n_models: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same votes with model names and outcome labels, as the service stores them."""
    idx_a, idx_b, score_a = synthetic_codes(n_votes, n_models, seed)
    names = np.array([ANCHOR] + [f"v{i}" for i in range(1, n_models)])
    rng = np.random.default_rng(seed + 1)
    half = np.where(rng.random(n_votes) < TIE_RATE / (TIE_RATE + BOTH_BAD_RATE), "tie", "both_bad")
    outcomes = np.where(score_a == 1.0, "a", np.where(score_a == 0.0, "b", half))
    return names[idx_a], names[idx_b], outcomes


# --- baseline ---------------------------------------------------------------------------


def faithful_compute_mle_elo(
    model_a: np.ndarray, model_b: np.ndarray, outcomes: np.ndarray
) -> dict[str, float]:
    """FastChat's compute_mle_elo (per-vote logistic regression), without pandas."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    # FastChat passes penalty=None; scikit-learn >= 1.8 spells "no penalty" C=inf instead.
    major_minor = tuple(int(part) for part in sklearn.__version__.split(".")[:2])
    no_penalty: dict[str, Any] = {"C": np.inf} if major_minor >= (1, 8) else {"penalty": None}
    models, codes = np.unique(np.concatenate([model_a, model_b]), return_inverse=True)
    n_votes = len(model_a)
    # Every vote twice: a win for A is two A wins; a tie is one A win and one B win.
    rows = np.arange(2 * n_votes)
    design = np.zeros((2 * n_votes, len(models)))
    design[rows, np.tile(codes[:n_votes], 2)] = +math.log(BASE)
    design[rows, np.tile(codes[n_votes:], 2)] = -math.log(BASE)
    target = np.zeros(2 * n_votes)
    target[np.tile(outcomes == "a", 2)] = 1.0
    target[:n_votes][(outcomes == "tie") | (outcomes == "both_bad")] = 1.0

    regression = LogisticRegression(fit_intercept=False, tol=1e-6, **no_penalty)
    regression.fit(design, target)
    ratings = SCALE * regression.coef_[0] + INITIAL_RATING
    ratings += INITIAL_RATING - ratings[list(models).index(ANCHOR)]
    return dict(zip(models.tolist(), ratings.tolist(), strict=True))


def baseline_function() -> tuple[str, Callable[[np.ndarray, np.ndarray, np.ndarray], dict]]:
    """FastChat's own compute_mle_elo when installed, else the re-implementation."""
    try:
        import pandas as pd
        from fastchat.serve.monitor.elo_analysis import compute_mle_elo
    except ImportError:
        return "re-implementation of FastChat compute_mle_elo", faithful_compute_mle_elo

    def via_fastchat(model_a: np.ndarray, model_b: np.ndarray, outcomes: np.ndarray) -> dict:
        winner = [FASTCHAT_WINNER[o] for o in outcomes]
        battles = pd.DataFrame({"model_a": model_a, "model_b": model_b, "winner": winner})
        ratings = compute_mle_elo(battles, SCALE=SCALE, BASE=BASE, INIT_RATING=INITIAL_RATING)
        return (ratings - ratings[ANCHOR] + INITIAL_RATING).to_dict()

    return "fastchat.serve.monitor.elo_analysis.compute_mle_elo", via_fastchat


def run_baseline(
    model_a: np.ndarray, model_b: np.ndarray, outcomes: np.ndarray, measured: int, seed: int
) -> tuple[str, dict[str, float], float, float]:
    """Point fit + `measured` bootstrap rounds; returns (name, ratings, fit s, s per round)."""
    name, compute = baseline_function()
    start = time.perf_counter()
    ratings = compute(model_a, model_b, outcomes)
    fit_seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(measured):
        # FastChat: battles.sample(frac=1.0, replace=True)
        resample = rng.integers(0, len(model_a), len(model_a))
        compute(model_a[resample], model_b[resample], outcomes[resample])
    per_round = (time.perf_counter() - start) / max(measured, 1)
    return name, ratings, fit_seconds, per_round


# --- scenarios --------------------------------------------------------------------------


def row(label: str, value: float, unit: str, digits: int = 3) -> None:
    print(f"  {label:<52}{value:>12.{digits}f} {unit}")


def scenario_vs_baseline(args: argparse.Namespace) -> None:
    model_a, model_b, outcomes = synthetic_votes(args.votes, args.models, args.seed)
    print(f"Scenario 1: {args.votes:,} votes over {args.models} versions, {args.rounds} rounds")

    start = time.perf_counter()
    counts = count_pairs(model_a, model_b, outcomes)
    counted = time.perf_counter()
    ours = bootstrap(counts, rounds=args.rounds, seed=args.seed, anchor=ANCHOR)
    done = time.perf_counter()
    ours_seconds = done - start
    assert fit(counts, anchor=ANCHOR) == ours.ratings
    row("ours: count_pairs (model names, outcome labels)", counted - start, "s")
    row(f"ours: fit + {args.rounds} bootstrap rounds", done - counted, "s")
    row("ours: total", ours_seconds, "s")
    row(
        "ours: mean 95% CI width",
        np.mean([w for m, w in ours.ci_width().items() if m != ANCHOR]),
        "pts",
        1,
    )

    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("  baseline skipped: scikit-learn is not installed (pip install scikit-learn)")
        return
    measured = min(args.baseline_rounds, args.rounds)
    name, theirs, fit_seconds, per_round = run_baseline(
        model_a, model_b, outcomes, measured, args.seed
    )
    baseline_seconds = fit_seconds + per_round * args.rounds
    max_diff = max(abs(ours.ratings[m] - theirs[m]) for m in ours.ratings)
    print(f"  baseline: {name}")
    row("baseline: point fit", fit_seconds, "s", 2)
    row(f"baseline: one bootstrap round (mean of {measured})", per_round, "s", 2)
    extrapolated = " (extrapolated)" if measured < args.rounds else ""
    row(f"baseline: fit + {args.rounds} rounds{extrapolated}", baseline_seconds, "s", 1)
    row("speedup (baseline total / ours total)", baseline_seconds / ours_seconds, "x", 0)
    row("max |ours - baseline| point ratings", max_diff, "pts", 4)
    if measured < args.rounds:
        print(
            f"  note: baseline ran {measured} of {args.rounds} rounds; its total is\n"
            f"        point fit + {args.rounds} x mean round time (linear extrapolation)"
        )


def scenario_big(args: argparse.Namespace) -> None:
    idx_a, idx_b, score_a = synthetic_codes(args.big_votes, args.big_models, args.seed)
    print(
        f"\nScenario 2: {args.big_votes:,} integer-coded votes over {args.big_models} versions,"
        f" {args.rounds} rounds (target <= 2 s)"
    )
    models = [ANCHOR] + [f"v{i}" for i in range(1, args.big_models)]
    start = time.perf_counter()
    counts = count_pairs_coded(idx_a, idx_b, score_a, args.big_models, models)
    counted = time.perf_counter()
    ratings = fit(counts, anchor=ANCHOR)
    fitted = time.perf_counter()
    result = bootstrap(counts, rounds=args.rounds, seed=args.seed, anchor=ANCHOR)
    done = time.perf_counter()
    assert result.ratings == ratings
    row("count_pairs_coded", counted - start, "s")
    row("fit", fitted - counted, "s")
    row(f"bootstrap ({args.rounds} rounds, incl. its own full fit)", done - fitted, "s")
    row("total", done - start, "s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100, help="bootstrap rounds")
    parser.add_argument(
        "--baseline-rounds",
        type=int,
        default=100,
        help="baseline rounds actually run (~2 s each); fewer are extrapolated linearly",
    )
    parser.add_argument("--big-votes", type=int, default=10_000_000)
    parser.add_argument("--big-models", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true", help="scenario 2 only")
    parser.add_argument("--skip-big", action="store_true", help="scenario 1 only")
    args = parser.parse_args(argv)
    if not args.skip_baseline:
        scenario_vs_baseline(args)
    if not args.skip_big:
        scenario_big(args)
    print(f"(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
