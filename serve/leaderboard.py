"""GET /v1/leaderboard (versions with rating, 95 % CI, rank, battles, win rate vs base, state,
and the style-controlled rating with its CI under `style`), the pairwise win rates behind it,
its history as JSON and as a chart. Ratings are refitted by the ranker (feedback/), never on
the request path: these routes only read what it stored."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from elo.bradley_terry import rank_with_ci
from elo.ratings_store import load_leaderboard, load_pair_counts_async
from serve.deps import gateway_state
from serve.errors import error_responses

router = APIRouter()


@router.get("/v1/leaderboard")
async def leaderboard(request: Request) -> dict[str, Any]:
    gw = gateway_state(request)
    board = await load_leaderboard(gw.redis, history=0)
    fit = board["fit"] or {}
    ratings, lower, upper = fit.get("ratings", {}), fit.get("lower", {}), fit.get("upper", {})
    ranks = rank_with_ci(ratings, lower, upper) if ratings else {}
    style = board["style"] or {}
    s_ratings, s_lower, s_upper = (style.get(k, {}) for k in ("ratings", "lower", "upper"))
    s_ranks = rank_with_ci(s_ratings, s_lower, s_upper) if s_ratings else {}
    rows = []
    for record in await gw.versions.all():
        if record.kind == "reward":
            continue
        rows.append({
            "id": record.id, "state": record.state, "parent": record.parent,
            "rating": ratings.get(record.id), "ci_lower": lower.get(record.id),
            "ci_upper": upper.get(record.id), "rank": ranks.get(record.id),
            "battles": fit.get("battles", {}).get(record.id, 0),
            "win_rate_vs_base": fit.get("win_rate_vs_base", {}).get(record.id),
            "online_elo": board["online"].get(record.id),
            # The rating with the answers' style held equal (length, headers, lists, bold).
            "style": {"rating": s_ratings.get(record.id), "ci_lower": s_lower.get(record.id),
                      "ci_upper": s_upper.get(record.id), "rank": s_ranks.get(record.id)},
        })
    rows.sort(key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0), r["id"]))
    return {"object": "list", "data": rows, "n_votes": fit.get("n_votes", 0),
            "fitted_at": fit.get("fitted_at"), "bootstrap_rounds": fit.get("rounds"),
            "anchor": fit.get("anchor"),
            "style": {"coefficients": style.get("coefficients"),
                      "coefficient_ci": style.get("coefficient_ci"),
                      "n_votes": style.get("n_votes", 0)}}


@router.get("/v1/leaderboard/pairwise")
async def leaderboard_pairwise(request: Request) -> dict[str, Any]:
    """The counts behind the latest fit, per pair: `win_rate[i][j]` is the share of the votes
    between models[i] and models[j] that i won (ties and both-bad count half; null where the
    two never met) and `battles[i][j]` how many there were."""
    counts = await load_pair_counts_async(gateway_state(request).redis)
    if counts is None:
        return {"object": "pairwise", "models": [], "win_rate": [], "battles": []}
    played = counts.battles
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(played > 0, counts.wins / np.maximum(played, 1), np.nan)
    return {"object": "pairwise", "models": counts.models,
            "win_rate": [[None if np.isnan(x) else round(float(x), 4) for x in row]
                         for row in rate],
            "battles": [[int(round(x)) for x in row] for row in played]}


@router.get("/v1/leaderboard/history", responses=error_responses(422))
async def leaderboard_history(request: Request, limit: int = 500) -> dict[str, Any]:
    board = await load_leaderboard(gateway_state(request).redis, history=max(1, min(limit, 10_000)))
    return {"object": "list", "data": board["history"]}


@router.get("/v1/leaderboard/history.png", include_in_schema=False)
async def leaderboard_chart(request: Request, limit: int = 500) -> Response:
    board = await load_leaderboard(gateway_state(request).redis, history=max(1, min(limit, 10_000)))
    png = await asyncio.to_thread(render_history_chart, board["history"])
    return Response(png, media_type="image/png")


def render_history_chart(history: list[dict[str, Any]]) -> bytes:
    """Rating of each version at each refit, one line per version."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    series: dict[str, tuple[list[datetime], list[float]]] = {}
    for point in history:
        when = datetime.fromtimestamp(point["ts"])
        for version, rating in point["ratings"].items():
            xs, ys = series.setdefault(version, ([], []))
            xs.append(when)
            ys.append(rating)
    for version, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", markersize=3, label=version)
    ax.set_title("Bradley–Terry rating per version (base = 1000)")
    ax.set_ylabel("rating")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no votes fitted yet", ha="center", va="center",
                transform=ax.transAxes)
    fig.autofmt_xdate()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
