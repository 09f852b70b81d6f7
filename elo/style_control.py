"""Style-controlled Bradley-Terry: the ratings with the answers' style held equal.

A voter who prefers the longer answer, or the one with headers and bold text, moves the plain
ratings toward whichever version writes that way. Chatbot Arena's style control adds the style
difference of the two answers as covariates of the Bradley-Terry model:

    P(a beats b) = sigmoid(theta_a - theta_b + gamma . z)

    d_f = (f(answer_a) - f(answer_b)) / (f(answer_a) + f(answer_b))   (0 when both are 0)

for each style feature f (words, markdown headers, list items, bold spans), z = d / rms(d) per
feature over the votes, and gamma what one unit of z is worth in log-odds. theta are the
ratings at equal style (z = 0), reported in the same rating points as the plain fit and
anchored the same way. Ties and both-bad count half, as in elo/bradley_terry.py. Self-pairs
(one version against itself, the cold start) say nothing about theta but do say how much
style sways the voters, so they are kept.

Why binning. Per-vote covariates break the plain fit's aggregation into (pair, outcome)
counts. Rounding each d_f to one of STYLE_BINS levels brings it back: votes aggregate into
cells (pair, outcome, binned d), tens of thousands for a million votes, and the fit and every
bootstrap round (a Poisson draw per cell) cost that many rows, not a million. The rounding
moves each d by at most half a step. The fit is Newton's method on those rows (gradient and
Hessian in closed form).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

from elo.bradley_terry import DEFAULT_ANCHOR, DEFAULT_CI, DEFAULT_L2
from elo.rating_scale import BASE, INITIAL_RATING, SCALE

STYLE_FEATURES = ("words", "headers", "list_items", "bold")
# Levels of each normalised difference on [-1, 1]: steps of 0.1 for length (it varies most
# and carries most of the effect), 0.5 for the formatting counts. Measured on 1M synthetic
# votes (benchmarks/style_fit.py): the same weights and ratings (within 1 point) as steps of
# 0.1 everywhere, with 59k cells instead of 193k; steps of 0.2 for length bias its weight.
STYLE_BINS = (21, 5, 5, 5)
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_STEP_TOL = 1e-7  # Newton stops once no weight moves more than this (~1e-5 rating points)
_MAXITER = 100


def style_features(answer: str) -> tuple[int, int, int, int]:
    """(words, markdown headers, list items, bold spans) of one answer."""
    return (len(answer.split()), len(_HEADER.findall(answer)), len(_LIST_ITEM.findall(answer)),
            len(_BOLD.findall(answer)))


def normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b), 0 where both are 0; a, b >= 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total > 0)


@dataclass(frozen=True, eq=False)
class StyleCells:
    """Votes aggregated into (model_a, model_b, score_a, binned style difference) cells."""

    models: list[str]
    idx_a: np.ndarray  # (C,) model index of side a
    idx_b: np.ndarray  # (C,)
    score_a: np.ndarray  # (C,) 1, 0.5 or 0
    z: np.ndarray  # (C, K) style covariates, in units of each feature's rms over the votes
    count: np.ndarray  # (C,) votes in the cell
    rms: np.ndarray  # (K,) the rms of each binned difference (1 where all are 0)

    @property
    def n_votes(self) -> int:
        return int(self.count.sum())


def style_cells(idx_a: np.ndarray, idx_b: np.ndarray, score_a: np.ndarray,
                diff: np.ndarray, models: list[str]) -> StyleCells:
    """Aggregate per-vote rows: model indices, score of a (0, 0.5, 1) and the (N, K)
    normalised style differences (a minus b)."""
    idx_a, idx_b = np.asarray(idx_a, dtype=np.int64), np.asarray(idx_b, dtype=np.int64)
    diff = np.asarray(diff, dtype=np.float64).reshape(len(idx_a), -1)
    steps = np.array(STYLE_BINS[:diff.shape[1]], dtype=np.int64) - 1
    bins = np.rint((np.clip(diff, -1.0, 1.0) + 1.0) * steps / 2).astype(np.int64)
    code = idx_a * len(models) + idx_b
    code = code * 3 + np.rint(2 * np.asarray(score_a, dtype=np.float64)).astype(np.int64)
    for k in range(bins.shape[1]):
        code = code * (steps[k] + 1) + bins[:, k]
    _, first, count = np.unique(code, return_index=True, return_counts=True)
    d = bins[first] * 2.0 / steps - 1.0  # the bin centres
    n = count.astype(np.float64)
    rms = np.sqrt((n[:, None] * d**2).sum(axis=0) / max(n.sum(), 1.0))
    rms = np.where(rms > 0, rms, 1.0)
    return StyleCells(models=list(models), idx_a=idx_a[first], idx_b=idx_b[first],
                      score_a=np.rint(2 * np.asarray(score_a, dtype=np.float64))[first] / 2.0,
                      z=d / rms, count=n, rms=rms)


def _fit_weights(cells: StyleCells, count: np.ndarray, l2: float,
                 w0: np.ndarray | None = None) -> np.ndarray:
    """Minimise -sum_c n_c [s_c log sigmoid(eta_c) + (1 - s_c) log sigmoid(-eta_c)]
    + l2/2 |w|^2 over w = (theta, gamma), eta_c = theta_a - theta_b + gamma . z_c, per vote
    (so the tolerance does not depend on the vote count), by Newton's method with step
    halving. The objective is convex and smooth: from the full fit's weights a bootstrap
    round converges in two or three steps. A row of the design has +1 at a, -1 at b and z,
    so gradient and Hessian are sums per model (bincount) instead of dense products."""
    n_models, n_style = len(cells.models), cells.z.shape[1]
    a, b, z, score = cells.idx_a, cells.idx_b, cells.z, cells.score_a
    n_votes = max(float(count.sum()), 1.0)
    weight, ridge = count / n_votes, l2 / n_votes

    def per_model(values: np.ndarray) -> np.ndarray:
        """sum over cells of values at a minus at b (what D^T does to a column)."""
        return (np.bincount(a, values, n_models) - np.bincount(b, values, n_models))

    def nll(w: np.ndarray) -> float:
        eta = w[a] - w[b] + z @ w[n_models:]
        return float(-np.sum(weight * (score * log_expit(eta) + (1 - score) * log_expit(-eta)))
                     + 0.5 * ridge * (w @ w))

    w = np.zeros(n_models + n_style) if w0 is None else w0.copy()
    current = nll(w)
    for _ in range(_MAXITER):
        p = expit(w[a] - w[b] + z @ w[n_models:])
        residual = weight * (p - score)
        grad = np.concatenate([per_model(residual), z.T @ residual]) + ridge * w
        v = weight * p * (1 - p)
        hessian = np.empty((w.size, w.size))
        # theta block: the graph Laplacian of the pairs, weighted by v
        pair = np.bincount(a * n_models + b, v, n_models * n_models).reshape(n_models, -1)
        pair = pair + pair.T
        hessian[:n_models, :n_models] = np.diag(pair.sum(axis=1)) - pair
        cross = np.stack([per_model(v * z[:, k]) for k in range(n_style)], axis=1)
        hessian[:n_models, n_models:] = cross
        hessian[n_models:, :n_models] = cross.T
        hessian[n_models:, n_models:] = (z * v[:, None]).T @ z
        hessian += ridge * np.eye(w.size)
        step = np.linalg.solve(hessian, grad)
        size = 1.0
        while (trial := nll(w - size * step)) > current and size > 1e-6:
            size /= 2  # far from the optimum a full step can overshoot
        w, improvement, current = w - size * step, current - trial, trial
        if np.max(np.abs(size * step)) < _STEP_TOL or improvement < 1e-15:
            break
    return w


@dataclass(frozen=True)
class StyleFit:
    """Style-controlled ratings (point, bootstrap interval) and the style coefficients
    (log-odds per rms unit of each feature's normalised difference)."""

    ratings: dict[str, float]
    lower: dict[str, float]
    upper: dict[str, float]
    coefficients: dict[str, float]
    coefficient_ci: dict[str, tuple[float, float]]
    n_votes: int
    rounds: int


def _ratings(theta: np.ndarray, models: list[str], anchor: str | None) -> np.ndarray:
    ratings = theta * SCALE / math.log(BASE)
    if anchor is not None and anchor in models:
        return ratings - ratings[models.index(anchor)] + INITIAL_RATING
    return ratings - ratings.mean() + INITIAL_RATING if ratings.size else ratings


def bootstrap_style(cells: StyleCells, rounds: int = 100, seed: int = 0,
                    anchor: str | None = DEFAULT_ANCHOR, l2: float = DEFAULT_L2,
                    ci: float = DEFAULT_CI) -> StyleFit:
    """The style-controlled fit on all votes, and percentile intervals from `rounds`
    resamples of the cells, each warm-started from the full fit. A resample draws each cell's
    count from Poisson(count): the Poisson bootstrap, which for thousands of votes matches
    the multinomial one (votes drawn with replacement) and draws all cells at once."""
    models, n_models = cells.models, len(cells.models)
    w_full = _fit_weights(cells, cells.count, l2)
    rng = np.random.default_rng(seed)
    n = cells.n_votes
    draws = rng.poisson(cells.count, size=(rounds, len(cells.count)))
    samples = np.array([_fit_weights(cells, draw.astype(np.float64), l2, w_full)
                        for draw in draws]).reshape(rounds, w_full.size)
    ratings = np.array([_ratings(s[:n_models], models, anchor) for s in samples])
    tail = 100.0 * (1.0 - ci) / 2.0
    low, high = np.percentile(ratings, [tail, 100.0 - tail], axis=0).reshape(2, n_models)
    gamma_low, gamma_high = np.percentile(samples[:, n_models:], [tail, 100.0 - tail],
                                          axis=0).reshape(2, -1)
    point = _ratings(w_full[:n_models], models, anchor)
    features = STYLE_FEATURES[:cells.z.shape[1]]
    return StyleFit(
        ratings=dict(zip(models, point.tolist(), strict=True)),
        lower=dict(zip(models, low.tolist(), strict=True)),
        upper=dict(zip(models, high.tolist(), strict=True)),
        coefficients=dict(zip(features, w_full[n_models:].tolist(), strict=True)),
        coefficient_ci={f: (lo, hi) for f, lo, hi in zip(
            features, gamma_low.tolist(), gamma_high.tolist(), strict=True)},
        n_votes=n, rounds=rounds)
