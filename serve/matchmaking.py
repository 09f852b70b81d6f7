"""Pick the two versions of a new battle: the matchmaker of elo/ over the live versions, with
the latest ratings; a single live version battles itself (cold start: two samples)."""

from __future__ import annotations

from core.settings import Settings
from deploy.registry import VersionRecord
from elo.matchmaker import Candidate, MatchmakerWeights, choose_pair
from elo.ratings_store import load_matchmaking_view
from serve.errors import APIError
from serve.state import GatewayState


def matchmaker_weights(settings: Settings) -> MatchmakerWeights:
    return MatchmakerWeights(
        target_ci_width=settings.matchmaker_target_ci_width,
        min_battles=settings.matchmaker_min_battles,
        new_candidate_boost=settings.matchmaker_new_boost,
        uniform_mix=settings.matchmaker_uniform_mix,
    )


async def choose_versions(gw: GatewayState) -> tuple[VersionRecord, VersionRecord]:
    live = await gw.versions.live()
    if not live:
        raise APIError(503, "No version is live; promote or register one.", "no_live_version")
    if len(live) == 1:
        return live[0], live[0]
    by_id = {r.id: r for r in live}
    # Per-version CI width and battle count from the ratings store (empty before a fit).
    board = await load_matchmaking_view(gw.redis)
    candidates = [
        Candidate(name=r.id, state=r.state, ci_width=board.get(r.id, {}).get("ci_width"),
                  battles=int(board.get(r.id, {}).get("battles", 0)))
        for r in live
    ]
    # Ratings turn on the preference for close (uncertain) pairs; before the first fit every
    # pair counts as a coin flip.
    ratings = {name: view["rating"] for name, view in board.items() if name != "__counts__"}
    name_a, name_b = choose_pair(candidates, board.get("__counts__"), gw.rng,
                                 matchmaker_weights(gw.settings), ratings=ratings or None)
    return by_id[name_a], by_id[name_b]
