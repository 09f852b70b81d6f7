"""Bradley-Terry ratings: maximum likelihood on aggregated pair counts, and a fast bootstrap.

The model (the same as Chatbot Arena's "Elo" leaderboard):

    P(i beats j) = 1 / (1 + base ** ((r_j - r_i) / scale)) = sigmoid(theta_i - theta_j)
    theta = r * ln(base) / scale          (the optimiser works in these natural-log units)

Why fitting on aggregated counts is exactly the fit on individual votes. The negative
log-likelihood is a sum over votes v = (a_v, b_v, s_v), s_v = score of a_v (1, 0 or 0.5):

    NLL(r) = -sum_v [ s_v log P(a_v beats b_v) + (1 - s_v) log P(b_v beats a_v) ]

Each term depends on the vote only through (pair, outcome). Gathering the terms that share
the factor log P(i beats j) multiplies it by the summed scores, i.e. by wins[i, j]:

    NLL(r) = -sum_{i,j} wins[i, j] log P(i beats j)

The same function of r, so the same minimiser; but each evaluation costs O(n_models^2) instead
of O(n_votes). (tests/test_elo_ratings.py checks this against a per-vote fit.)

The bootstrap uses the same idea: resampling N votes with replacement is the same as one
multinomial draw of N over the distinct (pair, outcome) cells with probabilities
cell_count / N. So a bootstrap round is a multinomial draw plus an n x n fit, instead of
FastChat's resample of N rows plus a logistic regression over an N x n design matrix.

The optimiser: scipy's trust-region Newton ("trust-exact") with the analytic gradient and
the analytic n x n Hessian (a weighted graph Laplacian). The objective is convex and smooth,
so it converges in a handful of steps (~2 from a warm start) to machine precision. L-BFGS-B
was measured first and dropped: it stops ~1e-5 rating points short (it needs measurable
decreases of the NLL, which float64 runs out of near the optimum), and on this 2-core machine
its per-iteration overhead in scipy's multithreaded BLAS made the bootstrap 4-6x slower
whenever the cores were busy (as they are next to a CPU inference server).
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from elo.outcomes import Outcome, scores_for_a
from elo.rating_scale import BASE, INITIAL_RATING, SCALE

DEFAULT_ANCHOR = "base"  # the untuned model: its rating is pinned at INITIAL_RATING
# Ridge on theta, in units of "pseudo-votes": far too small to move a well-determined rating,
# but it makes the fit unique (ratings are otherwise defined only up to a common shift) even
# when the comparison graph is disconnected (each component's level is pinned at 0) or a model
# has never played (it sits at the mean). Only for identifiability: not a prior.
DEFAULT_L2 = 1e-6
DEFAULT_ROUNDS = 100
DEFAULT_CI = 0.95

# Newton (trust-region) stopping rule on the gradient of the NLL per vote: ratings come out
# at machine precision, ~1e-9 rating points.
_GTOL = 1e-12
_MAXITER = 200

# count_pairs_coded puts every vote in a cell of (model_a, model_b, 2 * score_a):
# 0 = b won, 1 = tie or both_bad, 2 = a won.
_N_OUTCOME_CELLS = 3


@dataclass(frozen=True, eq=False)
class PairCounts:
    """Votes aggregated per pair of models, side (left/right) forgotten.

    wins[i, j]: times i beat j, a tie or both_bad adding 0.5 to wins[i, j] and to wins[j, i].
    battles[i, j]: votes between i and j (symmetric); battles = wins + wins.T.
    ties[i, j]: how many of those votes were tie or both_bad (symmetric).
    Self-pairs (model_a == model_b, the cold-start case with a single live version) are not
    counted: a model compared with itself says nothing about order. Arrays are float64.
    """

    models: list[str]
    wins: np.ndarray
    battles: np.ndarray
    ties: np.ndarray

    @property
    def n_votes(self) -> float:
        """Total number of (non-self-pair) votes."""
        return float(self.battles.sum() / 2)

    def index(self) -> dict[str, int]:
        """Row/column of each model in the matrices."""
        return {model: i for i, model in enumerate(self.models)}


def count_pairs_coded(
    idx_a: np.ndarray,
    idx_b: np.ndarray,
    score_a: np.ndarray,
    n_models: int,
    models: list[str] | None = None,
) -> PairCounts:
    """Aggregate integer-coded votes: model indices in [0, n_models), score_a in {0, 0.5, 1}.

    One bincount over a (model_a, model_b, outcome) cell code, so ~10M votes take ~0.1 s.
    `models` names the indices (default: "0", "1", ...).
    """
    idx_a = np.asarray(idx_a, dtype=np.intp)
    idx_b = np.asarray(idx_b, dtype=np.intp)
    half_points = 2.0 * np.asarray(score_a, dtype=np.float64)
    outcome_cell = half_points.astype(np.int8)
    if models is None:
        models = [str(i) for i in range(n_models)]
    if len(models) != n_models or len(set(models)) != n_models:
        raise ValueError(f"models must be {n_models} distinct names, got {models!r}")
    if not (idx_a.shape == idx_b.shape == outcome_cell.shape and idx_a.ndim == 1):
        raise ValueError("idx_a, idx_b and score_a must be 1-D arrays of the same length")
    lowest = min(idx_a.min(), idx_b.min()) if idx_a.size else 0
    highest = max(idx_a.max(), idx_b.max()) if idx_a.size else -1
    if lowest < 0 or highest >= n_models:
        raise ValueError(f"model indices must lie in [0, {n_models})")
    if np.any(outcome_cell != half_points) or np.any((half_points < 0) | (half_points > 2)):
        raise ValueError("score_a values must be 0, 0.5 or 1")

    cell_code = idx_a * n_models
    cell_code += idx_b
    cell_code *= _N_OUTCOME_CELLS
    cell_code += outcome_cell
    cells = np.bincount(cell_code, minlength=n_models * n_models * _N_OUTCOME_CELLS)
    cells = cells.reshape(n_models, n_models, _N_OUTCOME_CELLS).astype(np.float64)
    # Self-pairs fall on the diagonal: dropping them there is cheaper than masking the votes.
    diagonal = np.arange(n_models)
    cells[diagonal, diagonal, :] = 0.0
    b_won, tied, a_won = cells[..., 0], cells[..., 1], cells[..., 2]

    # A vote counts for the unordered pair whichever side each model was shown on.
    decisive = a_won + b_won.T  # decisive[i, j]: i beat j outright
    ties = tied + tied.T
    return PairCounts(
        models=list(models),
        wins=decisive + 0.5 * ties,
        battles=decisive + decisive.T + ties,
        ties=ties,
    )


def count_pairs(
    model_a: Sequence[str] | np.ndarray,
    model_b: Sequence[str] | np.ndarray,
    outcomes: Sequence[Outcome] | np.ndarray,
    models: list[str] | None = None,
) -> PairCounts:
    """Aggregate votes given by model name; `models` fixes the order (and may add unplayed ones).

    Names are integer-coded with one np.unique, then counted by `count_pairs_coded`.
    """
    names_a = np.asarray(model_a, dtype=str)
    names_b = np.asarray(model_b, dtype=str)
    if names_a.shape != names_b.shape or names_a.shape != (len(outcomes),):
        raise ValueError("model_a, model_b and outcomes must have the same length")
    names, codes = np.unique(np.concatenate([names_a, names_b]), return_inverse=True)
    codes = codes.reshape(-1)
    if models is None:
        models = names.tolist()
    else:
        position = {model: i for i, model in enumerate(models)}
        unknown = sorted(set(names.tolist()) - position.keys())
        if unknown:
            raise ValueError(f"votes name models missing from `models`: {unknown}")
        codes = np.array([position[name] for name in names.tolist()], dtype=np.intp)[codes]
    n_votes = len(names_a)
    return count_pairs_coded(
        codes[:n_votes], codes[n_votes:], scores_for_a(outcomes), len(models), models
    )


def _counts_from_votes(votes: Iterable[tuple[str, str, Outcome]]) -> PairCounts:
    rows = list(votes)
    model_a = [row[0] for row in rows]
    model_b = [row[1] for row in rows]
    outcomes = [row[2] for row in rows]
    return count_pairs(model_a, model_b, outcomes)


def _nll_and_grad(theta: np.ndarray, weight: np.ndarray, ridge: float) -> tuple[float, np.ndarray]:
    """-sum_{i,j} weight[i, j] log sigmoid(theta_i - theta_j) + ridge/2 |theta|^2, and gradient."""
    margin = theta[:, None] - theta[None, :]  # margin[i, j] = theta_i - theta_j
    nll = -np.sum(weight * log_expit(margin)) + 0.5 * ridge * (theta @ theta)
    # d/dm [-log sigmoid(m)] = -sigmoid(-m); margin[i, j] moves with +theta_i and -theta_j.
    dnll_dmargin = -weight * expit(-margin)
    grad = dnll_dmargin.sum(axis=1) - dnll_dmargin.sum(axis=0) + ridge * theta
    return float(nll), grad


def _hessian(theta: np.ndarray, weight: np.ndarray, ridge: float) -> np.ndarray:
    """Hessian of `_nll_and_grad`: a graph Laplacian with edge weights battles * p * (1 - p)."""
    p_win = expit(theta[:, None] - theta[None, :])
    curvature = (weight + weight.T) * p_win * (1.0 - p_win)
    return np.diag(curvature.sum(axis=1)) - curvature + ridge * np.eye(theta.size)


def _fit_theta(wins: np.ndarray, l2: float, theta0: np.ndarray | None = None) -> np.ndarray:
    """Minimise the Bradley-Terry NLL over theta (natural-log units) on a wins matrix.

    Newton with a trust region: the Hessian is positive definite thanks to the ridge.
    """
    if l2 <= 0.0:
        raise ValueError(f"l2 must be > 0 (it makes the fit unique), got {l2}")
    if wins.shape[0] == 0:
        return np.zeros(0)
    # Divide by the vote count so the tolerances mean the same for 100 votes and 10M votes.
    n_votes = max(float(wins.sum()), 1.0)
    weight = wins / n_votes
    ridge = l2 / n_votes
    start = np.zeros(wins.shape[0]) if theta0 is None else theta0
    result = minimize(
        _nll_and_grad,
        start,
        args=(weight, ridge),
        jac=True,
        hess=_hessian,
        method="trust-exact",
        options={"gtol": _GTOL, "maxiter": _MAXITER},
    )
    return result.x


def _to_ratings(
    theta: np.ndarray,
    models: list[str],
    anchor: str | None,
    scale: float,
    base: float,
    init_rating: float,
) -> np.ndarray:
    """Theta -> rating points, shifted so the anchor (or, without one, the mean) is init_rating."""
    ratings = theta * scale / math.log(base)
    if anchor is not None and anchor in models:
        return ratings - ratings[models.index(anchor)] + init_rating
    return ratings - ratings.mean() + init_rating if ratings.size else ratings


def fit(
    counts: PairCounts,
    anchor: str | None = DEFAULT_ANCHOR,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INITIAL_RATING,
    l2: float = DEFAULT_L2,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings from aggregated counts.

    Minimises -sum_{i,j} wins[i, j] log P(i beats j) + l2/2 |theta|^2 (see the module
    docstring), then shifts the ratings so `anchor` has exactly `init_rating` (the mean, if
    anchor is None or not among the models). A model that won (or lost) every vote has no
    finite MLE; the tiny l2 keeps it finite but very far out, as in any unregularised fit.
    """
    theta = _fit_theta(counts.wins, l2)
    ratings = _to_ratings(theta, counts.models, anchor, scale, base, init_rating)
    return dict(zip(counts.models, ratings.tolist(), strict=True))


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate from all the votes, and bootstrap median and percentile interval."""

    ratings: dict[str, float]
    lower: dict[str, float]
    upper: dict[str, float]
    median: dict[str, float]
    rounds: int
    ci: float

    def ci_width(self) -> dict[str, float]:
        """upper - lower per model (the anchor's is 0: its rating is pinned)."""
        return {model: self.upper[model] - self.lower[model] for model in self.ratings}


def bootstrap(
    votes_or_counts: PairCounts | Iterable[tuple[str, str, Outcome]],
    rounds: int = DEFAULT_ROUNDS,
    seed: int = 0,
    anchor: str | None = DEFAULT_ANCHOR,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INITIAL_RATING,
    l2: float = DEFAULT_L2,
    ci: float = DEFAULT_CI,
) -> BootstrapResult:
    """Bootstrap confidence intervals of the Bradley-Terry ratings.

    Each round resamples the votes with replacement, as one multinomial draw over the
    distinct (pair, outcome) cells (see the module docstring), and refits, warm-started from
    the full-data fit. Every round is anchored like `fit`, so the anchor's interval is a point.
    """
    if rounds < 1 or not 0.0 < ci < 1.0:
        raise ValueError(f"need rounds >= 1 and 0 < ci < 1, got rounds={rounds}, ci={ci}")
    if isinstance(votes_or_counts, PairCounts):
        counts = votes_or_counts
    else:
        counts = _counts_from_votes(votes_or_counts)
    models, n_models = counts.models, len(counts.models)
    theta_full = _fit_theta(counts.wins, l2)
    point = _to_ratings(theta_full, models, anchor, scale, base, init_rating)

    # The cells: "i beat j outright" for every ordered pair, "i and j tied" for i < j.
    upper_triangle = np.triu(np.ones((n_models, n_models), dtype=bool), k=1)
    decisive = counts.wins - 0.5 * counts.ties
    cells = np.concatenate([decisive.ravel(), counts.ties[upper_triangle]])
    played = np.flatnonzero(cells > 0)  # empty cells can never be drawn: skip them
    n_votes = int(np.rint(cells.sum()))

    rng = np.random.default_rng(seed)
    if n_votes == 0:  # nothing to resample: every round is the (all-equal) point estimate
        draws = np.zeros((rounds, played.size), dtype=np.int64)
    else:
        draws = rng.multinomial(n_votes, cells[played] / cells[played].sum(), size=rounds)
    samples = np.empty((rounds, n_models))
    for round_ in range(rounds):
        resampled = np.zeros_like(cells)
        resampled[played] = draws[round_]
        ties = np.zeros((n_models, n_models))
        ties[upper_triangle] = resampled[n_models * n_models :]
        wins = resampled[: n_models * n_models].reshape(n_models, n_models)
        wins = wins + 0.5 * (ties + ties.T)
        theta = _fit_theta(wins, l2, theta0=theta_full)
        samples[round_] = _to_ratings(theta, models, anchor, scale, base, init_rating)

    tail = 100.0 * (1.0 - ci) / 2.0
    lower, median, upper = np.percentile(samples, [tail, 50.0, 100.0 - tail], axis=0)

    def by_model(values: np.ndarray) -> dict[str, float]:
        return dict(zip(models, values.tolist(), strict=True))

    return BootstrapResult(
        ratings=by_model(point),
        lower=by_model(lower),
        upper=by_model(upper),
        median=by_model(median),
        rounds=rounds,
        ci=ci,
    )


def win_rate_matrix(counts: PairCounts) -> tuple[list[str], np.ndarray]:
    """matrix[i, j] = share of i-vs-j votes that i won (ties as half); NaN where never played."""
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(counts.battles > 0, counts.wins / counts.battles, np.nan)
    return list(counts.models), matrix


def rank_with_ci(
    ratings: Mapping[str, float],
    lower: Mapping[str, float],
    upper: Mapping[str, float],
) -> dict[str, int]:
    """Chatbot Arena rank: 1 + number of models whose lower bound is above this one's upper.

    Models whose intervals overlap share a rank. Returned best first.
    """
    models = sorted(ratings, key=lambda model: -ratings[model])
    lows = np.array([lower[model] for model in models])
    highs = np.array([upper[model] for model in models])
    ranks = 1 + (lows[None, :] > highs[:, None]).sum(axis=1)
    return dict(zip(models, ranks.tolist(), strict=True))
