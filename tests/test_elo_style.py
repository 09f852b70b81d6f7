"""Style-controlled Bradley-Terry (elo/style_control.py): pure logic, no servers."""

from __future__ import annotations

import numpy as np
import pytest

from elo.bradley_terry import bootstrap, count_pairs_coded
from elo.style_control import (
    bootstrap_style,
    normalised_difference,
    style_cells,
    style_features,
)

MODELS = ["base", "policy-v1", "policy-v2"]


def test_style_features_count_words_headers_lists_and_bold():
    text = "# Title\nSome **bold** words.\n\n- one\n- two\n1. three\n__also bold__"
    assert style_features(text) == (13, 1, 3, 2)
    assert style_features("") == (0, 0, 0, 0)
    assert normalised_difference(np.array([3, 0]), np.array([1, 0])).tolist() == [0.5, 0.0]


def crowd(n: int, seed: int, verbose_model: int, style_weight: float,
          quality: tuple[float, ...] = (0.0, 0.0, 0.0)):
    """Votes from voters who like long answers (log-odds `style_weight` per unit of the
    normalised length difference); `verbose_model` writes 3x longer answers."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = (a + rng.integers(1, 3, n)) % 3
    words_a = rng.integers(20, 60, n) * np.where(a == verbose_model, 3, 1)
    words_b = rng.integers(20, 60, n) * np.where(b == verbose_model, 3, 1)
    d = normalised_difference(words_a, words_b)
    q = np.array(quality)
    p_a = 1 / (1 + np.exp(-(q[a] - q[b] + style_weight * d)))
    score = (rng.random(n) < p_a).astype(float)
    diff = np.zeros((n, 4))
    diff[:, 0] = d
    return a, b, score, diff


def test_a_verbose_version_liked_for_its_length_is_level_once_style_is_controlled():
    a, b, score, diff = crowd(20_000, seed=1, verbose_model=1, style_weight=2.0)
    plain = bootstrap(count_pairs_coded(a, b, score, 3, MODELS), rounds=20)
    styled = bootstrap_style(style_cells(a, b, score, diff, MODELS), rounds=20)
    # Plain: policy-v1 wins on length alone. Controlled: all three equal within their CIs.
    assert plain.lower["policy-v1"] > plain.upper["base"] + 50
    for model in MODELS:
        assert styled.lower[model] <= 1000 <= styled.upper[model]
    assert styled.coefficients["words"] > 0
    low, high = styled.coefficient_ci["words"]
    assert low > 0 and low <= styled.coefficients["words"] <= high


def test_real_quality_differences_survive_style_control():
    a, b, score, diff = crowd(20_000, seed=2, verbose_model=2, style_weight=2.0,
                              quality=(0.0, 1.0, 0.0))
    styled = bootstrap_style(style_cells(a, b, score, diff, MODELS), rounds=20)
    # +1 in log-odds is 400 / ln(10) = 174 rating points.
    assert styled.ratings["policy-v1"] - styled.ratings["base"] == pytest.approx(174, abs=25)
    assert styled.lower["policy-v1"] > styled.upper["policy-v2"]


def test_without_style_differences_it_is_the_plain_fit():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 3, 5000)
    b = (a + rng.integers(1, 3, 5000)) % 3
    score = rng.choice([0.0, 0.5, 1.0], 5000, p=[0.3, 0.2, 0.5])
    plain = bootstrap(count_pairs_coded(a, b, score, 3, MODELS), rounds=5)
    styled = bootstrap_style(style_cells(a, b, score, np.zeros((5000, 4)), MODELS), rounds=5)
    for model in MODELS:
        assert styled.ratings[model] == pytest.approx(plain.ratings[model], abs=1e-4)


def test_refit_stores_the_style_fit_beside_the_plain_one(tmp_path, redis_url):
    """Archive -> refit -> Redis -> GET /v1/leaderboard's source: policy-v1 writes the longer
    answer in 80 % of its battles, and the crowd prefers the longer answer, nothing else."""
    import asyncio

    import redis

    from elo.ratings_store import load_leaderboard
    from feedback.archive import Archive
    from feedback.refit import refit_ratings
    from feedback.vote_record import VoteRecord

    rng = np.random.default_rng(0)
    user = [{"role": "user", "content": "Explain."}]
    records = []
    for i in range(2000):
        v1_on_a = rng.random() < 0.5
        v1_long = rng.random() < 0.8
        short, long = "Yes.", " ".join(["word"] * int(rng.integers(30, 60)))
        v1_answer, base_answer = (long, short) if v1_long else (short, long)
        answer_a, answer_b = (v1_answer, base_answer) if v1_on_a else (base_answer, v1_answer)
        model_a, model_b = ("policy-v1", "base") if v1_on_a else ("base", "policy-v1")
        long_side = "a" if len(answer_a) > len(answer_b) else "b"
        # Voters pick the longer answer 80 % of the time: nothing but style.
        winner = long_side if rng.random() < 0.8 else ("b" if long_side == "a" else "a")
        records.append(VoteRecord(battle_id=f"v{i}", model_a=model_a, model_b=model_b,
                                  winner=winner, conversation_a=user, conversation_b=user,
                                  answer_a=answer_a, answer_b=answer_b, session="s",
                                  battle_created_at=1.0, voted_at=2.0 + i))
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    archive.insert_votes(records)
    client = redis.Redis.from_url(redis_url)
    fit = refit_ratings(client, archive, rounds=20)
    board = asyncio.run(_board(redis_url, load_leaderboard))
    style = board["style"]
    assert fit.lower["policy-v1"] > 1080  # the plain fit credits policy-v1 with its style
    assert style["coefficients"]["words"] > 0  # the controlled one puts it on the length
    assert style["lower"]["policy-v1"] <= 1000 <= style["upper"]["policy-v1"]
    assert style["n_votes"] == 2000


async def _board(url, load_leaderboard):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return await load_leaderboard(client)
    finally:
        await client.aclose()
