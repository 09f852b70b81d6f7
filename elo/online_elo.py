"""Online Elo: one small rating step per vote, in arrival order.

This is the live "trend" rating shown between Bradley-Terry refits. It depends on vote order
and on k, so the leaderboard of record is the Bradley-Terry fit (`elo.bradley_terry`); online
Elo is cheap, incremental and good enough to show movement as votes come in.

    E_a  = 1 / (1 + base ** ((r_b - r_a) / scale))     expected score of A
    r_a += k * (s_a - E_a)                              s_a from `elo.outcomes.score_for_a`
    r_b -= k * (s_a - E_a)                              zero-sum: B moves by the same amount
"""

from collections.abc import Iterable, Mapping

from elo.outcomes import Outcome, score_for_a
from elo.rating_scale import BASE, INITIAL_RATING, SCALE

DEFAULT_K = 4.0  # small k: many votes per day, so each vote should move ratings little


def expected_score(r_a: float, r_b: float, scale: float = SCALE, base: float = BASE) -> float:
    """Probability that A beats B under the Elo / Bradley-Terry logistic model."""
    return 1.0 / (1.0 + base ** ((r_b - r_a) / scale))


def update(
    ratings: Mapping[str, float],
    model_a: str,
    model_b: str,
    outcome: Outcome,
    k: float = DEFAULT_K,
    initial: float = INITIAL_RATING,
) -> dict[str, float]:
    """Return a new ratings dict after one vote; models not yet rated start at `initial`.

    Self-pairs (model_a == model_b) are ignored: at cold start only one version is live and
    both answers come from it. Such a vote compares a model with itself, so it carries no
    information about order, and an update would move the same rating up and down at once.
    """
    new = dict(ratings)
    _apply(new, model_a, model_b, outcome, k, initial)
    return new


def _apply(
    ratings: dict[str, float],
    model_a: str,
    model_b: str,
    outcome: Outcome,
    k: float,
    initial: float,
) -> None:
    """The in-place step behind `update` (so `replay` does not copy the dict once per vote)."""
    if model_a == model_b:
        return
    r_a = ratings.get(model_a, initial)
    r_b = ratings.get(model_b, initial)
    delta = k * (score_for_a(outcome) - expected_score(r_a, r_b))
    ratings[model_a] = r_a + delta
    ratings[model_b] = r_b - delta


def replay(
    votes: Iterable[tuple[str, str, Outcome]],
    k: float = DEFAULT_K,
    initial: float = INITIAL_RATING,
) -> dict[str, float]:
    """Ratings after applying `update` to every (model_a, model_b, outcome) vote in order."""
    ratings: dict[str, float] = {}
    for model_a, model_b, outcome in votes:
        _apply(ratings, model_a, model_b, outcome, k, initial)
    return ratings
