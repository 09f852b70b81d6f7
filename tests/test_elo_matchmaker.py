"""Matchmaker: which two live versions answer next."""

from collections import Counter
from typing import Any

import numpy as np
import pytest

from elo import (
    Candidate,
    MatchmakerWeights,
    PairCounts,
    choose_pair,
    count_pairs_coded,
    pair_probabilities,
)

WEIGHTS = MatchmakerWeights(
    target_ci_width=40.0, min_battles=200, new_candidate_boost=4.0, uniform_mix=0.2
)
N_DRAWS = 4_000


def established(name: str, state: str = "candidate") -> Candidate:
    return Candidate(name=name, state=state, ci_width=15.0, battles=5_000)  # type: ignore[arg-type]


def fresh(name: str) -> Candidate:
    return Candidate(name=name, state="candidate", ci_width=None, battles=12)


def counts_with_battles(models: list[str], battles: dict[tuple[str, str], int]) -> PairCounts:
    """PairCounts where each listed pair has that many votes, half won by each side."""
    position = {model: i for i, model in enumerate(models)}
    idx_a: list[int] = []
    idx_b: list[int] = []
    score_a: list[float] = []
    for (first, second), n in battles.items():
        idx_a += [position[first]] * n
        idx_b += [position[second]] * n
        score_a += [1.0, 0.0] * (n // 2) + [0.5] * (n % 2)
    return count_pairs_coded(
        np.array(idx_a, dtype=int),
        np.array(idx_b, dtype=int),
        np.array(score_a),
        len(models),
        models,
    )


def draw_many(live: list[Candidate], **kwargs: Any) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    return [choose_pair(live, rng=rng, weights=WEIGHTS, **kwargs) for _ in range(N_DRAWS)]


def share_of_pairs_with(model: str, pairs: list[tuple[str, str]]) -> float:
    return sum(model in pair for pair in pairs) / len(pairs)


def test_never_self_pair_never_retired() -> None:
    live = [
        established("base", "current"),
        established("v1"),
        fresh("v2"),
        Candidate(name="old", state="retired", ci_width=5.0, battles=90_000),
    ]
    pairs = draw_many(live, counts=None)
    assert all(left != right for left, right in pairs)
    assert not any("old" in pair for pair in pairs)
    assert {frozenset(pair) for pair in pairs} == {
        frozenset(p) for p in [("base", "v1"), ("base", "v2"), ("v1", "v2")]
    }


def test_left_right_order_is_random() -> None:
    pairs = draw_many([established("base", "current"), established("v1")], counts=None)
    base_on_left = sum(left == "base" for left, _ in pairs) / len(pairs)
    assert 0.45 < base_on_left < 0.55


def test_one_live_version_plays_itself() -> None:
    rng = np.random.default_rng(0)
    assert choose_pair([fresh("base")], None, rng, WEIGHTS) == ("base", "base")
    only_live = [Candidate("gone", "retired", 5.0, 100), established("base", "current")]
    assert choose_pair(only_live, None, rng, WEIGHTS) == ("base", "base")
    assert pair_probabilities([fresh("base")], None, WEIGHTS) == {("base", "base"): 1.0}


def test_no_live_version_is_an_error() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no live model version"):
        choose_pair([], None, rng, WEIGHTS)
    with pytest.raises(ValueError, match="no live model version"):
        choose_pair([Candidate("gone", "retired", 5.0, 100)], None, rng, WEIGHTS)
    with pytest.raises(ValueError, match="distinct"):
        choose_pair([fresh("v1"), fresh("v1")], None, rng, WEIGHTS)


def test_probabilities_sum_to_one_with_uniform_floor() -> None:
    models = ["base", "v1", "v2", "v3"]
    live = [established(m) for m in models]
    counts = counts_with_battles(models, {("base", "v1"): 5_000, ("v2", "v3"): 40})
    ratings = {"base": 1000.0, "v1": 1600.0, "v2": 1010.0, "v3": 1000.0}
    probs = pair_probabilities(live, counts, WEIGHTS, ratings)
    assert len(probs) == 6
    assert sum(probs.values()) == pytest.approx(1.0)
    floor = WEIGHTS.uniform_mix / len(probs)
    assert min(probs.values()) >= floor * (1 - 1e-12)


def test_new_candidate_gets_more_exposure() -> None:
    # Same ratings and no counts: only the exposure boost tells the versions apart.
    live = [established("base", "current"), established("v1"), fresh("v2"), established("v3")]
    pairs = draw_many(live, counts=None)
    assert share_of_pairs_with("v2", pairs) > 1.5 * share_of_pairs_with("v1", pairs)

    # A wide CI or too few battles count as new too.
    for unsure in (
        Candidate("v2", "candidate", 90.0, 5_000),
        Candidate("v2", "candidate", 5.0, 50),
    ):
        probs = pair_probabilities([*live[:2], unsure, live[3]], None, WEIGHTS)
        assert probs[("v1", "v2")] == pytest.approx(
            WEIGHTS.new_candidate_boost * probs[("base", "v1")]
        )


def test_new_candidate_with_few_battles_dominates_with_counts() -> None:
    models = ["base", "v1", "v2"]
    live = [established("base", "current"), established("v1"), fresh("v2")]
    counts = counts_with_battles(
        models, {("base", "v1"): 4_990, ("base", "v2"): 6, ("v1", "v2"): 6}
    )
    ratings = {"base": 1000.0, "v1": 1040.0, "v2": 1000.0}
    pairs = draw_many(live, counts=counts, ratings=ratings)
    assert share_of_pairs_with("v2", pairs) > 0.9
    assert share_of_pairs_with("v2", pairs) > 1.5 * share_of_pairs_with("v1", pairs)


def test_uncertain_pair_is_picked_more_than_lopsided_one() -> None:
    models = ["base", "close", "far"]
    live = [established(m) for m in models]
    counts = counts_with_battles(
        models, {("base", "close"): 500, ("base", "far"): 500, ("close", "far"): 500}
    )
    ratings = {"base": 1000.0, "close": 1010.0, "far": 1450.0}
    probs = pair_probabilities(live, counts, WEIGHTS, ratings)
    assert probs[("base", "close")] > 1.3 * probs[("base", "far")]

    picked = Counter(frozenset(pair) for pair in draw_many(live, counts=counts, ratings=ratings))
    assert picked[frozenset(("base", "close"))] > 1.3 * picked[frozenset(("base", "far"))]


def test_rarely_played_pair_is_picked_more() -> None:
    models = ["base", "v1", "v2"]
    live = [established(m) for m in models]
    counts = counts_with_battles(
        models, {("base", "v1"): 2_000, ("base", "v2"): 50, ("v1", "v2"): 2_000}
    )
    probs = pair_probabilities(live, counts, WEIGHTS, {m: 1000.0 for m in models})
    assert probs[("base", "v2")] > 3 * probs[("base", "v1")]
    assert probs[("base", "v1")] == pytest.approx(probs[("v1", "v2")])


def test_unknown_ratings_and_unknown_models_in_counts_are_coin_flips() -> None:
    live = [established("base"), established("v1"), established("new")]
    counts = counts_with_battles(["base", "v1"], {("base", "v1"): 100})
    probs = pair_probabilities(live, counts, WEIGHTS, ratings={"base": 1000.0})
    # "new" never played: its pairs have n = 0 and outrank the played pair.
    assert probs[("base", "new")] == pytest.approx(probs[("v1", "new")])
    assert probs[("base", "new")] > probs[("base", "v1")]


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError):
        MatchmakerWeights(uniform_mix=1.5)
    with pytest.raises(ValueError):
        MatchmakerWeights(new_candidate_boost=0.5)
    with pytest.raises(ValueError):
        MatchmakerWeights(target_ci_width=0.0)
    with pytest.raises(AttributeError):
        WEIGHTS.uniform_mix = 0.5  # type: ignore[misc]
