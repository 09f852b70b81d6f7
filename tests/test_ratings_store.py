"""elo/ratings_store.py against a real Redis: online ratings once per vote, the fit, the
pair counts and the history, and the async readers the gateway uses."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from elo.bradley_terry import bootstrap, count_pairs
from elo.online_elo import replay
from elo.ratings_store import (
    APPLIED_KEY,
    BTFit,
    OnlineVote,
    apply_online_votes,
    load_fit,
    load_history,
    load_leaderboard,
    load_matchmaking_view,
    load_online,
    load_pair_counts,
    save_fit,
)

VOTES = [("base", "p1", "b"), ("base", "p1", "tie"), ("p1", "p2", "a"), ("p2", "base", "b"),
         ("p1", "p1", "a"), ("p2", "p1", "both_bad"), ("base", "p2", "b")] * 20


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def online_votes() -> list[OnlineVote]:
    return [OnlineVote(f"v{i}", a, b, w) for i, (a, b, w) in enumerate(VOTES)]


def test_online_votes_applied_once(client: redis.Redis) -> None:
    votes = online_votes()
    assert apply_online_votes(client, votes[:50], k=8.0) == 50
    assert apply_online_votes(client, votes[40:] + votes[:5], k=8.0) == len(votes) - 50
    assert apply_online_votes(client, votes, k=8.0) == 0
    assert load_online(client) == pytest.approx(replay(VOTES, k=8.0))
    assert client.zcard(APPLIED_KEY) == len(votes)  # self-pairs count as applied


def test_concurrent_rankers_do_not_lose_updates(client: redis.Redis, redis_url: str) -> None:
    votes = online_votes()
    halves = [votes[0::2], votes[1::2]]

    def apply(half: list[OnlineVote]) -> None:
        own = redis.Redis.from_url(redis_url)
        for i in range(0, len(half), 3):
            apply_online_votes(own, half[i:i + 3] + votes[:2])  # overlaps too
        own.close()

    threads = [threading.Thread(target=apply, args=(half,)) for half in halves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ratings = load_online(client)
    assert client.zcard(APPLIED_KEY) == len(votes)
    # Order differs from arrival order, but Elo is zero-sum: every update was kept.
    assert sum(ratings.values()) == pytest.approx(1000.0 * len(ratings))
    assert set(ratings) == {"base", "p1", "p2"}


def make_fit() -> tuple[BTFit, object]:
    counts = count_pairs([v[0] for v in VOTES], [v[1] for v in VOTES], [v[2] for v in VOTES])
    result = bootstrap(counts, rounds=20, anchor="base")
    return BTFit.from_bootstrap(result, counts, "base", fitted_at=1234.5), counts


def test_fit_pairs_and_history_round_trip(client: redis.Redis) -> None:
    assert load_fit(client) is None and load_pair_counts(client) is None
    fit, counts = make_fit()
    assert fit.battles == {"base": 80, "p1": 80, "p2": 80}  # the 20 self-pairs left out
    assert fit.win_rate_vs_base["p1"] == pytest.approx(30 / 40)  # 20 wins + 20 ties of 40
    assert fit.win_rate_vs_base["base"] is None
    save_fit(client, fit, counts)
    assert load_fit(client) == fit
    stored = load_pair_counts(client)
    assert stored.models == counts.models
    np.testing.assert_array_equal(stored.wins, counts.wins)
    np.testing.assert_array_equal(stored.ties, counts.ties)
    for _ in range(4):
        save_fit(client, fit, counts, history_limit=3)
    history = load_history(client)
    assert len(history) == 3 and history[-1] == {
        "ts": 1234.5, "ratings": fit.ratings, "lower": fit.lower, "upper": fit.upper,
        "n_votes": fit.n_votes}
    assert len(load_history(client, limit=2)) == 2


def test_async_readers(client: redis.Redis, redis_url: str) -> None:
    fit, counts = make_fit()

    async def read() -> tuple[dict, dict, dict]:
        async_client = aioredis.Redis.from_url(redis_url)
        try:
            empty = await load_matchmaking_view(async_client)
            save_fit(client, fit, counts)
            apply_online_votes(client, online_votes()[:10])
            return empty, await load_matchmaking_view(async_client), await load_leaderboard(
                async_client)
        finally:
            await async_client.aclose()

    empty, view, board = asyncio.run(read())
    assert empty == {}
    assert view["p2"] == {"rating": fit.ratings["p2"], "ci_width": fit.ci_width()["p2"],
                          "battles": 80}
    assert view["__counts__"].models == counts.models
    assert board["fit"]["ratings"] == fit.ratings and len(board["history"]) == 1
    assert set(board["online"]) == {"base", "p1", "p2"}
