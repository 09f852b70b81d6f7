"""Ratings from side-by-side votes: outcomes, online Elo, Bradley-Terry with bootstrap CIs,
and the matchmaker that picks which two model versions answer next.

Pure functions on plain values (numpy arrays, dicts, dataclasses), and a thin Redis store of
the ratings (`ratings_store.py`); imports nothing of the project but `core`.
"""

from elo.bradley_terry import (
    BootstrapResult,
    PairCounts,
    bootstrap,
    count_pairs,
    count_pairs_coded,
    fit,
    rank_with_ci,
    win_rate_matrix,
)
from elo.matchmaker import (
    Candidate,
    MatchmakerWeights,
    choose_pair,
    needs_exposure,
    pair_probabilities,
)
from elo.online_elo import expected_score, replay, update
from elo.outcomes import OUTCOMES, Outcome, score_for_a, scores_for_a

__all__ = [
    "OUTCOMES",
    "BootstrapResult",
    "Candidate",
    "MatchmakerWeights",
    "Outcome",
    "PairCounts",
    "bootstrap",
    "choose_pair",
    "count_pairs",
    "count_pairs_coded",
    "expected_score",
    "fit",
    "needs_exposure",
    "pair_probabilities",
    "rank_with_ci",
    "replay",
    "score_for_a",
    "scores_for_a",
    "update",
    "win_rate_matrix",
]
