"""Matchmaking: which two live model versions answer the next chat request.

Three rules, in order of importance:
1. Never a version against itself when two or more are live. With exactly one live version
   (cold start) both answers come from it: (v, v); the rating code ignores such votes.
2. Versions whose rating is still uncertain (CI wider than the target, CI unknown, or too few
   battles) get extra exposure: a multiplicative boost on every pair they are in.
3. Otherwise favour the pairs where one more vote teaches the most (Chatbot Arena's active
   sampling): the standard error of a pair's win rate is sqrt(p (1 - p) / n), so one more
   battle reduces it by
       sqrt(p (1 - p)) * (1 / sqrt(n) - 1 / sqrt(n + 1))
   which is largest for close pairs (p near 0.5) and for rarely played pairs (small n).
   A uniform floor keeps every pair in play, so the ratings never rest on stale comparisons.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import expit

from elo.bradley_terry import PairCounts
from elo.rating_scale import BASE, SCALE

CandidateState = Literal["candidate", "current", "retired"]


@dataclass(frozen=True)
class Candidate:
    """A model version as the matchmaker sees it."""

    name: str
    state: CandidateState
    ci_width: float | None = None  # upper - lower of its rating CI; None when not yet known
    battles: int = 0  # votes it has been in


@dataclass(frozen=True)
class MatchmakerWeights:
    """Knobs of the pair distribution (the project's settings object builds one)."""

    target_ci_width: float = 50.0  # rating points: narrower than this counts as established
    min_battles: int = 300  # fewer battles than this counts as new, whatever the CI says
    new_candidate_boost: float = 4.0  # multiplies the probability of pairs with a new version
    uniform_mix: float = 0.2  # share of the uniform distribution mixed into the active one

    def __post_init__(self) -> None:
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {self.uniform_mix}")
        if self.new_candidate_boost < 1.0:
            raise ValueError(f"new_candidate_boost must be >= 1, got {self.new_candidate_boost}")
        if self.target_ci_width <= 0.0 or self.min_battles < 0:
            raise ValueError("target_ci_width must be > 0 and min_battles >= 0")


def needs_exposure(candidate: Candidate, weights: MatchmakerWeights) -> bool:
    """True while a version's rating is not yet pinned down well enough."""
    return (
        candidate.ci_width is None
        or candidate.ci_width > weights.target_ci_width
        or candidate.battles < weights.min_battles
    )


def pair_probabilities(
    live: list[Candidate],
    counts: PairCounts | None,
    weights: MatchmakerWeights = MatchmakerWeights(),
    ratings: Mapping[str, float] | None = None,
) -> dict[tuple[str, str], float]:
    """Probability of each unordered pair (in `live` order), summing to 1.

    `counts` gives the battles per pair (none if None); `ratings` the current ratings (a pair
    with an unrated member is taken as a coin flip, p = 0.5). Retired versions are dropped.
    """
    playable = [candidate for candidate in live if candidate.state != "retired"]
    names = [candidate.name for candidate in playable]
    if not playable:
        raise ValueError("no live model version to choose from (all retired or none given)")
    if len(set(names)) != len(names):
        raise ValueError(f"live versions must have distinct names, got {names}")
    if len(playable) == 1:
        return {(names[0], names[0]): 1.0}

    first, second = np.triu_indices(len(playable), k=1)
    known = ratings or {}
    rating = np.array([known.get(name, np.nan) for name in names])
    p_win = expit((rating[first] - rating[second]) * math.log(BASE) / SCALE)
    p_win = np.where(np.isnan(p_win), 0.5, p_win)

    pair_battles = np.zeros(first.size)
    if counts is not None:
        index = counts.index()
        row = np.array([index.get(name, -1) for name in names])
        played = (row[first] >= 0) & (row[second] >= 0)
        pair_battles[played] = counts.battles[row[first][played], row[second][played]]

    # Drop in standard error from one more battle; n + 1 (one pseudo-battle) keeps
    # never-played pairs finite, and they still come out on top.
    n = pair_battles + 1.0
    gain = np.sqrt(p_win * (1.0 - p_win)) * (1.0 / np.sqrt(n) - 1.0 / np.sqrt(n + 1.0))
    uniform = np.full(first.size, 1.0 / first.size)
    active = gain / gain.sum() if gain.sum() > 0 else uniform
    probs = (1.0 - weights.uniform_mix) * active + weights.uniform_mix * uniform

    new = np.array([needs_exposure(candidate, weights) for candidate in playable])
    probs = probs * np.where(new[first] | new[second], weights.new_candidate_boost, 1.0)
    probs = probs / probs.sum()
    return {
        (names[i], names[j]): float(prob)
        for i, j, prob in zip(first.tolist(), second.tolist(), probs, strict=True)
    }


def choose_pair(
    live: list[Candidate],
    counts: PairCounts | None,
    rng: np.random.Generator,
    weights: MatchmakerWeights = MatchmakerWeights(),
    ratings: Mapping[str, float] | None = None,
) -> tuple[str, str]:
    """Draw (left, right) from `pair_probabilities`, left/right order randomised.

    Raises ValueError when no version is live; returns (v, v) when exactly one is.
    """
    distribution = pair_probabilities(live, counts, weights, ratings)
    pairs = list(distribution)
    pick = pairs[rng.choice(len(pairs), p=np.fromiter(distribution.values(), dtype=float))]
    # Randomise the side so position bias (people prefer the left answer) averages out.
    return pick if rng.random() < 0.5 else (pick[1], pick[0])
