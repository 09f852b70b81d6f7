"""Optional auto-promotion (setting `auto_promote`, off by default): a candidate becomes current
once the lower bound of its Bradley-Terry confidence interval is above the current version's
rating, i.e. the arena is confident it is better.

`should_auto_promote` and `pick_promotion` are pure. `maybe_promote` is the hook the ranker
calls after each refit: it loads the chosen version into every vLLM replica first (the same
rule as an operator's promote: never flip `current` to a version the servers lack), then
promotes it in the registry with actor "auto-promote".

The leaderboard is a dict, either one row per version
    {"policy-v3": {"rating": 1032.0, "lower": 1010.5, "upper": 1051.2, ...}, ...}
or columns as in elo.bradley_terry.BootstrapResult
    {"ratings": {"policy-v3": 1032.0, ...}, "lower": {...}, "upper": {...}}.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from arena.settings import Settings
from deploy.manifest import Manifest, verify
from deploy.registry import Registry, VersionRecord

log = logging.getLogger("arena.deploy.auto_promote")
ACTOR = "auto-promote"


@dataclass(frozen=True)
class Rating:
    rating: float
    lower: float
    upper: float


def should_auto_promote(candidate: Rating | None, current: Rating | None) -> bool:
    """True when the candidate's lower CI bound is strictly above the current's rating."""
    return candidate is not None and current is not None and candidate.lower > current.rating


def pick_promotion(current: str, candidates: Iterable[str],
                   board: Mapping[str, Rating]) -> str | None:
    """The candidate to promote (the one with the highest lower bound), or None."""
    eligible = [c for c in candidates
                if c != current and should_auto_promote(board.get(c), board.get(current))]
    return max(eligible, key=lambda c: (board[c].lower, c), default=None)


def ratings_from_leaderboard(leaderboard: Mapping[str, Any]) -> dict[str, Rating]:
    """Read either leaderboard layout (module doc); versions without an interval are left out."""
    if isinstance(leaderboard.get("ratings"), Mapping):
        rows = {v: {"rating": r, "lower": leaderboard.get("lower", {}).get(v),
                    "upper": leaderboard.get("upper", {}).get(v)}
                for v, r in leaderboard["ratings"].items()}
    else:
        rows = {v: row for v, row in leaderboard.items() if isinstance(row, Mapping)}
    board: dict[str, Rating] = {}
    for version, row in rows.items():
        try:
            board[version] = Rating(float(row["rating"]), float(row["lower"]),
                                    float(row["upper"]))
        except (KeyError, TypeError, ValueError):
            continue
    return board


def maybe_promote(registry: Registry, leaderboard_dict: Mapping[str, Any],
                  settings: Settings) -> str | None:
    """Promote the best eligible candidate if `settings.auto_promote`; return its id or None."""
    if not settings.auto_promote:
        return None
    current = registry.current()
    candidates = [r.id for r in registry.policies() if r.state == "candidate"]
    choice = pick_promotion(current, candidates, ratings_from_leaderboard(leaderboard_dict))
    if choice is None:
        return None
    record = registry.get(choice)
    if not _load_into_replicas(settings, record):
        return None
    old, new = registry.promote(choice, actor=ACTOR)
    log.info("auto-promoted %s (was %s): its rating's lower bound beat the current's", new, old)
    return new


def _load_into_replicas(settings: Settings, record: VersionRecord) -> bool:
    """Load the adapter into every replica that answers, by its own name; False (and nothing
    promoted) if its files changed, a replica refuses it, or none answers."""
    if record.path is None:
        return True
    try:
        verify(Path(record.path), Manifest(files=record.files))
    except ValueError as error:
        log.error("not auto-promoting %s: %s", record.id, error)
        return False
    loaded = 0
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
        for url in settings.effective_vllm_urls:
            try:
                response = client.post(f"{url.rstrip('/')}/v1/load_lora_adapter",
                                       json={"lora_name": record.id, "lora_path": record.path})
            except httpx.HTTPError as error:
                log.warning("auto-promote: replica %s unreachable (%s)", url, error)
                continue
            if response.status_code != 200 and "already" not in response.text:
                log.error("not auto-promoting %s: %s refused it: %s", record.id, url,
                          response.text[:300])
                return False
            loaded += 1
    return loaded > 0
