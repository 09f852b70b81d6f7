"""Pick the two versions of a new battle: the matchmaker of elo/ over the live versions, with
the latest ratings; a single live version battles itself (cold start: two samples)."""

from __future__ import annotations

import random

import numpy as np

from deploy.registry import VersionRecord
from serve.errors import APIError
from serve.state import GatewayState

_rng = np.random.default_rng()


async def choose_versions(gw: GatewayState) -> tuple[VersionRecord, VersionRecord]:
    live = await gw.versions.live()
    if not live:
        raise APIError(503, "No version is live; promote or register one.", "no_live_version")
    if len(live) == 1:
        return live[0], live[0]
    by_id = {r.id: r for r in live}
    try:
        from elo.matchmaker import Candidate, choose_pair
    except ImportError:  # matchmaker not installed: uniform over distinct pairs
        a, b = random.sample(live, 2)
        return a, b
    board = await _leaderboard_snapshot(gw)
    candidates = [
        Candidate(name=r.id, state=r.state, ci_width=board.get(r.id, {}).get("ci_width"),
                  battles=int(board.get(r.id, {}).get("battles", 0)))
        for r in live
    ]
    # Ratings turn on the preference for close (uncertain) pairs; before the first fit every
    # pair counts as a coin flip.
    ratings = {name: view["rating"] for name, view in board.items() if name != "__counts__"}
    name_a, name_b = choose_pair(candidates, board.get("__counts__"), _rng,
                                 gw.settings.matchmaker_weights(), ratings=ratings or None)
    return by_id[name_a], by_id[name_b]


async def _leaderboard_snapshot(gw: GatewayState) -> dict:
    """Per-version CI width and battle count from the ratings store (empty before a fit)."""
    try:
        from elo.ratings_store import load_matchmaking_view
    except ImportError:
        return {}
    return await load_matchmaking_view(gw.redis)
