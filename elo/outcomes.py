"""The vote outcome vocabulary, and the single place that says how each outcome counts.

A vote compares the answer of model A (left) with the answer of model B (right):

    "a"         A's answer is better          -> a win for A
    "b"         B's answer is better          -> a win for B
    "tie"       both are as good              -> half a win to each (FastChat convention)
    "both_bad"  both are bad                  -> also half a win to each

Why both_bad counts as a tie for ratings: "both equally bad" says nothing about which model is
better, only that neither answer was acceptable. Counting it as half a win each is what FastChat
does for "tie (bothbad)" and keeps every vote in the likelihood. (The reward-model side of the
project may treat both_bad differently, e.g. as a negative label for both answers; that is not
a rating question.)
"""

from collections.abc import Sequence
from typing import Final, Literal, get_args

import numpy as np

Outcome = Literal["a", "b", "tie", "both_bad"]
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

# Score of model A for each outcome; model B gets 1 - score. Ties are half a win each way.
_SCORE_FOR_A: Final[dict[str, float]] = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


def score_for_a(outcome: Outcome) -> float:
    """Score of model A for one vote: 1 (A won), 0 (B won), 0.5 (tie or both_bad)."""
    try:
        return _SCORE_FOR_A[outcome]
    except KeyError:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}") from None


def scores_for_a(outcomes: Sequence[str] | np.ndarray) -> np.ndarray:
    """Vectorised `score_for_a`: a float64 array of A's scores, one per vote."""
    labels = np.asarray(outcomes, dtype=str)
    scores = np.full(labels.shape, np.nan)
    for outcome, score in _SCORE_FOR_A.items():
        scores[labels == outcome] = score
    unknown = np.isnan(scores)
    if unknown.any():
        raise ValueError(f"unknown outcome {labels[unknown][0]!r}; expected one of {OUTCOMES}")
    return scores
