"""The leaderboard in Redis: the thin I/O layer around the pure rating functions of elo/.

Keys (all JSON is UTF-8 text):

    arena:ratings:online           hash   model -> online Elo rating (the live trend)
    arena:ratings:online:applied   zset   vote ids applied to the online ratings, scored by
                                          when; the consumers forget those older than the
                                          dedup window (feedback/consumers.py housekeeping)
    arena:ratings:fit              string the latest Bradley-Terry fit (`BTFit`): board of record
    arena:ratings:pairs            string the pair counts that fit used (`PairCounts` as JSON)
    arena:ratings:history          list   one {"ts", "ratings", "lower", "upper", "n_votes"}
                                          point per refit, oldest first (points stored before
                                          the CI was kept have only "ts" and "ratings")

Functions take a redis-py client (sync, or `redis.asyncio` for the `async` readers the gateway
calls) and plain values; they read no settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import redis

from core.text import as_str
from elo.bradley_terry import BootstrapResult, PairCounts
from elo.online_elo import DEFAULT_K, INITIAL_RATING, update
from elo.outcomes import Outcome
from elo.style_control import StyleFit

ONLINE_KEY = "arena:ratings:online"
APPLIED_KEY = "arena:ratings:online:applied"
FIT_KEY = "arena:ratings:fit"
PAIRS_KEY = "arena:ratings:pairs"
HISTORY_KEY = "arena:ratings:history"
STYLE_FIT_KEY = "arena:ratings:style"  # the style-controlled fit (elo/style_control.py)
HISTORY_LIMIT = 10_000  # points kept (one per refit that saw new votes)
WATCH_RETRIES = 50


class OnlineVote(NamedTuple):
    vote_id: str
    model_a: str
    model_b: str
    outcome: Outcome


@dataclass(frozen=True)
class BTFit:
    """One Bradley-Terry refit: point ratings, bootstrap interval, and per-model counts."""

    ratings: dict[str, float]
    lower: dict[str, float]
    upper: dict[str, float]
    battles: dict[str, int]  # votes each model took part in (self-pairs not counted)
    win_rate_vs_base: dict[str, float | None]  # share of votes against `anchor` won (ties half)
    anchor: str | None
    n_votes: int
    rounds: int
    ci: float
    fitted_at: float

    @classmethod
    def from_bootstrap(
        cls,
        result: BootstrapResult,
        counts: PairCounts,
        anchor: str | None,
        fitted_at: float | None = None,
    ) -> BTFit:
        index = counts.index()
        battles = counts.battles.sum(axis=1)
        win_rate: dict[str, float | None] = {}
        for model, i in index.items():
            j = index.get(anchor) if anchor is not None else None
            played = counts.battles[i, j] if j is not None else 0.0
            win_rate[model] = float(counts.wins[i, j] / played) if played else None
        return cls(
            ratings=result.ratings,
            lower=result.lower,
            upper=result.upper,
            battles={model: int(round(battles[i])) for model, i in index.items()},
            win_rate_vs_base=win_rate,
            anchor=anchor,
            n_votes=int(round(counts.n_votes)),
            rounds=result.rounds,
            ci=result.ci,
            fitted_at=time.time() if fitted_at is None else fitted_at,
        )

    def ci_width(self) -> dict[str, float]:
        return {model: self.upper[model] - self.lower[model] for model in self.ratings}

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> BTFit:
        return cls(**json.loads(raw))


def pair_counts_to_json(counts: PairCounts) -> str:
    return json.dumps(
        {
            "models": counts.models,
            "wins": counts.wins.tolist(),
            "battles": counts.battles.tolist(),
            "ties": counts.ties.tolist(),
        },
        separators=(",", ":"),
    )


def pair_counts_from_json(raw: str | bytes) -> PairCounts:
    data = json.loads(raw)
    n_models = len(data["models"])

    def matrix(values: list[list[float]]) -> np.ndarray:
        return np.array(values, dtype=np.float64).reshape(n_models, n_models)

    return PairCounts(
        models=data["models"],
        wins=matrix(data["wins"]),
        battles=matrix(data["battles"]),
        ties=matrix(data["ties"]),
    )


def _decode_hash(raw: dict[Any, Any]) -> dict[str, float]:
    return {as_str(model): float(rating) for model, rating in raw.items()}


# --- online Elo ----------------------------------------------------------------------------
def load_online(client: redis.Redis) -> dict[str, float]:
    return _decode_hash(client.hgetall(ONLINE_KEY))


def apply_online_votes(
    client: redis.Redis,
    votes: Sequence[OnlineVote],
    k: float = DEFAULT_K,
    initial: float = INITIAL_RATING,
) -> int:
    """Apply each vote not applied before, in order, to the online ratings; returns how many
    were new. The ratings and the applied-set change in one MULTI under WATCH, so a vote
    delivered twice, or seen by two rankers at once, moves the ratings exactly once (as long
    as its id is remembered). Self-pairs count as applied but move nothing
    (see `elo.online_elo.update`)."""
    if not votes:
        return 0
    applied_at = time.time()  # the score by which the consumers forget an id
    ids = list(dict.fromkeys(vote.vote_id for vote in votes))
    for _attempt in range(WATCH_RETRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(ONLINE_KEY, APPLIED_KEY)
                seen = {vote_id: score is not None for vote_id, score
                        in zip(ids, pipe.zmscore(APPLIED_KEY, ids), strict=True)}
                ratings = _decode_hash(pipe.hgetall(ONLINE_KEY))
                new_ids: list[str] = []
                for vote in votes:
                    if seen[vote.vote_id]:
                        continue
                    seen[vote.vote_id] = True
                    new_ids.append(vote.vote_id)
                    ratings = update(ratings, vote.model_a, vote.model_b, vote.outcome, k, initial)
                if not new_ids:
                    pipe.unwatch()
                    return 0
                pipe.multi()
                if ratings:
                    pipe.hset(ONLINE_KEY, mapping=ratings)
                pipe.zadd(APPLIED_KEY, dict.fromkeys(new_ids, applied_at))
                pipe.execute()
                return len(new_ids)
            except redis.WatchError:
                continue
    raise RuntimeError(f"online ratings stayed contended for {WATCH_RETRIES} attempts")


# --- Bradley-Terry fit and history ---------------------------------------------------------
def save_fit(
    client: redis.Redis, fit: BTFit, counts: PairCounts, history_limit: int = HISTORY_LIMIT
) -> None:
    """Store the fit, its pair counts and a history point (ratings with their CI bounds),
    all at once."""
    point = json.dumps({"ts": fit.fitted_at, "ratings": fit.ratings, "lower": fit.lower,
                        "upper": fit.upper, "n_votes": fit.n_votes}, separators=(",", ":"))
    with client.pipeline(transaction=True) as pipe:
        pipe.set(FIT_KEY, fit.to_json())
        pipe.set(PAIRS_KEY, pair_counts_to_json(counts))
        pipe.rpush(HISTORY_KEY, point)
        pipe.ltrim(HISTORY_KEY, -history_limit, -1)
        pipe.execute()


def save_style_fit(client: redis.Redis, fit: StyleFit) -> None:
    client.set(STYLE_FIT_KEY, json.dumps(asdict(fit), separators=(",", ":")))


def load_fit(client: redis.Redis) -> BTFit | None:
    raw = client.get(FIT_KEY)
    return BTFit.from_json(raw) if raw else None


def load_pair_counts(client: redis.Redis) -> PairCounts | None:
    raw = client.get(PAIRS_KEY)
    return pair_counts_from_json(raw) if raw else None


def load_history(client: redis.Redis, limit: int | None = None) -> list[dict[str, Any]]:
    """History points {"ts", "ratings", "lower", "upper", "n_votes"}, oldest first (the last
    `limit` if given)."""
    start = -limit if limit else 0
    return [json.loads(raw) for raw in client.lrange(HISTORY_KEY, start, -1)]


# --- async readers for the gateway ---------------------------------------------------------
async def load_leaderboard(client: Any, history: int = 200) -> dict[str, Any]:
    """JSON-ready board for an HTTP route (`client` is a redis.asyncio.Redis): the latest
    fit (or None before the first), online ratings, and the last `history` points."""
    raw_fit, raw_style = await client.mget(FIT_KEY, STYLE_FIT_KEY)
    online = _decode_hash(await client.hgetall(ONLINE_KEY))
    points = await client.lrange(HISTORY_KEY, -history, -1) if history else []
    return {
        "fit": asdict(BTFit.from_json(raw_fit)) if raw_fit else None,
        "style": json.loads(raw_style) if raw_style else None,
        "online": online,
        "history": [json.loads(raw) for raw in points],
    }


async def load_pair_counts_async(client: Any) -> PairCounts | None:
    """The latest fit's pair counts (`client` is a redis.asyncio.Redis); None before it."""
    raw = await client.get(PAIRS_KEY)
    return pair_counts_from_json(raw) if raw else None


async def load_matchmaking_view(client: Any) -> dict[str, Any]:
    """What the matchmaker needs (`client` is a redis.asyncio.Redis): per model
    {"rating", "ci_width", "battles"} from the latest fit, and under "__counts__" the
    `PairCounts` it used. Empty before the first fit."""
    raw_fit, raw_pairs = await client.mget(FIT_KEY, PAIRS_KEY)
    if not raw_fit:
        return {}
    fit = BTFit.from_json(raw_fit)
    widths = fit.ci_width()
    view: dict[str, Any] = {
        model: {
            "rating": fit.ratings[model],
            "ci_width": widths[model],
            "battles": fit.battles.get(model, 0),
        }
        for model in fit.ratings
    }
    view["__counts__"] = pair_counts_from_json(raw_pairs) if raw_pairs else None
    return view
