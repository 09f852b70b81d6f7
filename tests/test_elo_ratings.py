"""Ratings: outcome scores, online Elo, pair counting, the Bradley-Terry fit and its bootstrap."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from elo import (
    OUTCOMES,
    PairCounts,
    bootstrap,
    count_pairs,
    count_pairs_coded,
    expected_score,
    fit,
    rank_with_ci,
    replay,
    score_for_a,
    scores_for_a,
    update,
    win_rate_matrix,
)
from elo.bradley_terry import DEFAULT_L2

TRUE_RATINGS = {"base": 1000.0, "v1": 1070.0, "v2": 1160.0, "v3": 930.0, "v4": 1290.0, "v5": 850.0}
TIE_RATE = 0.1  # share of votes that are tie or both_bad


def synthetic_votes(
    true_ratings: dict[str, float], n_votes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Votes between random distinct pairs, drawn from the Bradley-Terry model with ties.

    A tie (score 0.5) happens with probability TIE_RATE; decisive votes are drawn so that the
    expected score of A is exactly P(A beats B), i.e. ties do not bias the ratings.
    """
    rng = np.random.default_rng(seed)
    models = np.array(list(true_ratings))
    strength = np.array(list(true_ratings.values()))
    idx_a = rng.integers(0, len(models), n_votes)
    idx_b = (idx_a + rng.integers(1, len(models), n_votes)) % len(models)  # never a self-pair
    p_a = expected_score(strength[idx_a], strength[idx_b])
    p_decisive_a = (p_a - TIE_RATE / 2) / (1 - TIE_RATE)
    tie = rng.random(n_votes) < TIE_RATE
    a_won = rng.random(n_votes) < p_decisive_a
    outcomes = np.where(tie, np.where(rng.random(n_votes) < 0.5, "tie", "both_bad"), "a")
    outcomes = np.where(~tie & ~a_won, "b", outcomes)
    return models[idx_a], models[idx_b], outcomes


# --- outcomes ---------------------------------------------------------------------------


def test_outcome_scores() -> None:
    assert OUTCOMES == ("a", "b", "tie", "both_bad")
    assert [score_for_a(o) for o in OUTCOMES] == [1.0, 0.0, 0.5, 0.5]
    assert scores_for_a(["b", "a", "both_bad", "tie", "a"]).tolist() == [0, 1, 0.5, 0.5, 1]
    with pytest.raises(ValueError, match="unknown outcome"):
        score_for_a("left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown outcome"):
        scores_for_a(["a", "draw"])


# --- online Elo -------------------------------------------------------------------------


def test_expected_score() -> None:
    assert expected_score(1000, 1000) == 0.5
    assert expected_score(1400, 1000) == pytest.approx(10 / 11)  # 400 points = 10:1 odds
    assert expected_score(1000, 1400) + expected_score(1400, 1000) == pytest.approx(1.0)


def test_online_elo_winner_up_loser_down_by_same_amount() -> None:
    ratings = {"base": 1000.0, "v1": 1000.0}
    after = update(ratings, "v1", "base", "a", k=4.0)
    assert after["v1"] == pytest.approx(1002.0)  # k * (1 - 0.5)
    assert after["base"] == pytest.approx(998.0)
    assert ratings == {"base": 1000.0, "v1": 1000.0}  # input untouched: a new dict comes back

    after = update(ratings, "v1", "base", "b")
    assert after["base"] > 1000.0 > after["v1"]
    assert after["base"] - 1000.0 == pytest.approx(1000.0 - after["v1"])


def test_online_elo_new_models_start_at_initial() -> None:
    after = update({}, "v1", "v2", "a", k=10.0, initial=1500.0)
    assert after == {"v1": 1505.0, "v2": 1495.0}


def test_online_elo_ignores_self_pairs() -> None:
    ratings = {"base": 1000.0}
    assert update(ratings, "base", "base", "a") == ratings
    assert replay([("base", "base", "a"), ("base", "base", "b")]) == {}


def test_online_elo_ties_pull_ratings_together() -> None:
    for outcome in ("tie", "both_bad"):
        after = update({"strong": 1200.0, "weak": 1000.0}, "weak", "strong", outcome)
        assert 1000.0 < after["weak"] < after["strong"] < 1200.0
    # Equal ratings and a tie: nothing to learn.
    assert update({"x": 1000.0, "y": 1000.0}, "x", "y", "tie") == {"x": 1000.0, "y": 1000.0}


def test_replay_applies_votes_in_order() -> None:
    votes = [("v1", "base", "a"), ("base", "v1", "tie"), ("v2", "v1", "b")]
    expected: dict[str, float] = {}
    for vote in votes:
        expected = update(expected, *vote)  # type: ignore[arg-type]
    assert replay(votes) == expected  # type: ignore[arg-type]


# --- counting ---------------------------------------------------------------------------


def test_count_pairs_by_hand() -> None:
    counts = count_pairs(
        ["base", "v1", "base", "v1", "base", "v1"],
        ["v1", "base", "v1", "v1", "v2", "v2"],
        ["a", "a", "tie", "a", "both_bad", "b"],
    )
    assert counts.models == ["base", "v1", "v2"]
    # base beat v1 once, v1 beat base once (from the right side), one tie; v1-v1 is skipped.
    np.testing.assert_array_equal(counts.wins, [[0.0, 1.5, 0.5], [1.5, 0.0, 0.0], [0.5, 1.0, 0.0]])
    np.testing.assert_array_equal(counts.battles, [[0, 3, 1], [3, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(counts.ties, [[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(counts.battles, counts.wins + counts.wins.T)
    assert counts.n_votes == 5


def test_count_pairs_with_explicit_models_and_coded_inputs_agree() -> None:
    model_a, model_b, outcomes = synthetic_votes(TRUE_RATINGS, 2_000, seed=3)
    models = ["unplayed", *TRUE_RATINGS]
    by_name = count_pairs(model_a, model_b, outcomes, models=models)
    assert by_name.models == models
    assert by_name.battles[0].sum() == 0  # listed but never played

    position = {model: i for i, model in enumerate(models)}
    coded = count_pairs_coded(
        np.array([position[m] for m in model_a]),
        np.array([position[m] for m in model_b]),
        scores_for_a(outcomes),
        len(models),
        models,
    )
    for field in ("wins", "battles", "ties"):
        np.testing.assert_array_equal(getattr(by_name, field), getattr(coded, field))


def test_count_pairs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="missing from `models`"):
        count_pairs(["base"], ["v9"], ["a"], models=["base", "v1"])
    with pytest.raises(ValueError, match="same length"):
        count_pairs(["base", "v1"], ["v1"], ["a"])
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        count_pairs_coded(np.array([0]), np.array([1]), np.array([0.7]), 2)
    with pytest.raises(ValueError, match="indices"):
        count_pairs_coded(np.array([0]), np.array([2]), np.array([1.0]), 2)


# --- Bradley-Terry fit ------------------------------------------------------------------


def per_vote_fit(
    model_a: np.ndarray, model_b: np.ndarray, outcomes: np.ndarray
) -> dict[str, float]:
    """The textbook fit: one log-likelihood term per vote (plus the same tiny ridge)."""
    models = sorted(set(model_a) | set(model_b))
    position = {model: i for i, model in enumerate(models)}
    keep = model_a != model_b
    idx_a = np.array([position[m] for m in model_a[keep]])
    idx_b = np.array([position[m] for m in model_b[keep]])
    score = scores_for_a(outcomes[keep])

    def nll_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = theta[idx_a] - theta[idx_b]
        nll = -np.sum(score * log_expit(margin) + (1 - score) * log_expit(-margin))
        dnll_dmargin = expit(margin) - score
        grad = np.bincount(idx_a, dnll_dmargin, len(models))
        grad -= np.bincount(idx_b, dnll_dmargin, len(models))
        return nll + 0.5 * DEFAULT_L2 * theta @ theta, grad + DEFAULT_L2 * theta

    result = minimize(
        nll_and_grad, np.zeros(len(models)), jac=True, method="BFGS", options={"gtol": 1e-10}
    )
    ratings = result.x * 400 / math.log(10)
    ratings += 1000 - ratings[position["base"]]
    return dict(zip(models, ratings.tolist(), strict=True))


def test_fit_on_counts_equals_fit_on_individual_votes() -> None:
    model_a, model_b, outcomes = synthetic_votes(TRUE_RATINGS, 800, seed=7)
    # Some self-pairs too: both fits must ignore them.
    model_b[:20] = model_a[:20]
    ours = fit(count_pairs(model_a, model_b, outcomes))
    reference = per_vote_fit(model_a, model_b, outcomes)
    assert ours.keys() == reference.keys()
    for model in ours:
        assert ours[model] == pytest.approx(reference[model], abs=1e-6)


def test_fit_anchor_and_mean() -> None:
    counts = count_pairs(*synthetic_votes(TRUE_RATINGS, 3_000, seed=1))
    anchored = fit(counts)
    assert anchored["base"] == 1000.0
    centred = fit(counts, anchor=None, init_rating=1500.0)
    assert np.mean(list(centred.values())) == pytest.approx(1500.0)
    # Same ratings up to a shift.
    shift = centred["base"] - anchored["base"]
    for model in anchored:
        assert centred[model] - anchored[model] == pytest.approx(shift, abs=1e-6)
    assert fit(counts, anchor="not-a-model").keys() == anchored.keys()  # falls back to mean


def test_fit_by_hand_two_models() -> None:
    # base won 3 of 4 votes (one of them a tie counted as half): odds 3:1 -> 400 log10(3).
    counts = count_pairs(["base"] * 4, ["v1"] * 4, ["a", "a", "tie", "tie"])
    ratings = fit(counts)
    assert ratings["base"] == 1000.0
    assert ratings["v1"] == pytest.approx(1000.0 - 400 * math.log10(3), abs=1e-3)


def test_fit_disconnected_and_unplayed_models_stay_finite() -> None:
    counts = count_pairs_coded(
        np.array([0, 2, 2]),
        np.array([1, 3, 3]),
        np.array([1.0, 0.5, 1.0]),
        5,
        ["base", "v1", "v2", "v3", "v4"],
    )
    ratings = fit(counts)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["base"] == 1000.0 and ratings["v1"] < 1000.0
    assert ratings["v2"] > ratings["v3"]
    assert fit(count_pairs([], [], [])) == {}


def test_fit_recovers_true_ratings_with_bootstrap_ci() -> None:
    model_a, model_b, outcomes = synthetic_votes(TRUE_RATINGS, 40_000, seed=0)
    result = bootstrap(count_pairs(model_a, model_b, outcomes), rounds=100, seed=0)

    assert result.ratings["base"] == 1000.0
    assert sorted(result.ratings, key=result.ratings.get) == sorted(
        TRUE_RATINGS, key=TRUE_RATINGS.get
    )
    for model, true in TRUE_RATINGS.items():
        assert result.lower[model] <= true <= result.upper[model], model
        assert result.lower[model] <= result.median[model] <= result.upper[model]
        assert abs(result.ratings[model] - true) < 20.0
    widths = result.ci_width()
    assert widths["base"] == 0.0  # the anchor is pinned in every round
    assert all(0.0 < widths[m] < 60.0 for m in TRUE_RATINGS if m != "base")


def test_bootstrap_interval_coverage_is_about_right() -> None:
    # Over many independent data sets the 95% interval should hold the truth ~95% of the time.
    true = {"base": 1000.0, "v1": 1050.0, "v2": 950.0, "v3": 1120.0}
    hits = []
    for seed in range(30):
        result = bootstrap(count_pairs(*synthetic_votes(true, 3_000, seed)), rounds=60, seed=seed)
        hits += [result.lower[m] <= true[m] <= result.upper[m] for m in true if m != "base"]
    assert 0.85 <= np.mean(hits) <= 1.0


def test_multinomial_bootstrap_matches_resampling_individual_votes() -> None:
    # Drawing N votes with replacement, then counting, is a multinomial draw over the cells;
    # so the interval widths of both procedures must agree (up to Monte-Carlo noise).
    true = {"base": 1000.0, "v1": 1080.0, "v2": 940.0, "v3": 1010.0}
    model_a, model_b, outcomes = synthetic_votes(true, 2_000, seed=11)
    rounds = 300
    ours = bootstrap(count_pairs(model_a, model_b, outcomes), rounds=rounds, seed=1)

    rng = np.random.default_rng(2)
    samples = []
    for _ in range(rounds):
        pick = rng.integers(0, len(model_a), len(model_a))
        ratings = fit(count_pairs(model_a[pick], model_b[pick], outcomes[pick], models=list(true)))
        samples.append([ratings[m] for m in true])
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    for model, width in zip(true, high - low, strict=True):
        if model != "base":
            assert ours.ci_width()[model] == pytest.approx(width, rel=0.25), model


def test_bootstrap_from_votes_equals_bootstrap_from_counts() -> None:
    model_a, model_b, outcomes = synthetic_votes(TRUE_RATINGS, 1_000, seed=5)
    from_counts = bootstrap(count_pairs(model_a, model_b, outcomes), rounds=20, seed=4)
    from_votes = bootstrap(
        zip(model_a, model_b, outcomes, strict=True),  # type: ignore[arg-type]
        rounds=20,
        seed=4,
    )
    assert from_counts == from_votes


def test_bootstrap_rejects_bad_arguments() -> None:
    counts = count_pairs(["base"], ["v1"], ["a"])
    with pytest.raises(ValueError):
        bootstrap(counts, rounds=0)
    with pytest.raises(ValueError):
        bootstrap(counts, ci=1.0)
    with pytest.raises(ValueError, match="l2"):
        fit(counts, l2=0.0)


# --- tables -----------------------------------------------------------------------------


def test_win_rate_matrix_by_hand() -> None:
    counts = count_pairs(
        ["base", "base", "base", "v1", "v2"],
        ["v1", "v1", "v1", "base", "base"],
        ["a", "b", "tie", "b", "a"],
    )
    models, matrix = win_rate_matrix(counts)
    assert models == ["base", "v1", "v2"]
    # base vs v1: base won 2 (one from the right side), lost 1, tied 1 -> 2.5 / 4.
    assert matrix[0, 1] == 0.625 and matrix[1, 0] == 0.375
    assert matrix[2, 0] == 1.0 and matrix[0, 2] == 0.0
    assert np.isnan(matrix[1, 2]) and np.isnan(matrix[2, 1])  # never played
    assert np.isnan(np.diag(matrix)).all()


def test_win_rate_matrix_of_empty_counts() -> None:
    empty = PairCounts(
        models=[], wins=np.zeros((0, 0)), battles=np.zeros((0, 0)), ties=np.zeros((0, 0))
    )
    models, matrix = win_rate_matrix(empty)
    assert models == [] and matrix.shape == (0, 0)


def test_rank_with_ci_by_hand() -> None:
    ratings = {"a": 1200.0, "b": 1180.0, "c": 1100.0, "d": 1000.0}
    lower = {"a": 1170.0, "b": 1165.0, "c": 1060.0, "d": 990.0}
    upper = {"a": 1230.0, "b": 1210.0, "c": 1160.0, "d": 1010.0}
    # a, b overlap: both rank 1. c: a's and b's lower bounds are above c's upper -> 3.
    # d: a, b and c all have lower bounds above 1010 -> 4.
    assert rank_with_ci(ratings, lower, upper) == {"a": 1, "b": 1, "c": 3, "d": 4}
    assert list(rank_with_ci(ratings, lower, upper)) == ["a", "b", "c", "d"]
    # Overlap with a model that is itself out-ranked still shares the top spot.
    lower["c"] = 1140.0
    upper["c"] = 1175.0
    assert rank_with_ci(ratings, lower, upper) == {"a": 1, "b": 1, "c": 1, "d": 4}
