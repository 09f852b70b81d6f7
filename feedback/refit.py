"""The ranker's periodic Bradley-Terry refit: pair counts from the archive (every vote ever
archived, so the board of record never depends on stream order or redelivery), a fit with
bootstrap confidence intervals, stored with a history point by elo/ratings_store.py; beside it
the style-controlled fit (elo/style_control.py) on the same votes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import redis

from elo.bradley_terry import DEFAULT_ANCHOR, PairCounts, bootstrap, count_pairs_coded
from elo.outcomes import scores_for_a
from elo.ratings_store import PAIRS_KEY, BTFit, pair_counts_to_json, save_fit, save_style_fit
from elo.style_control import StyleFit, bootstrap_style, normalised_difference, style_cells
from feedback.archive import Archive, FlaggedVotes, PairCount

log = logging.getLogger("arena.feedback")
REFIT_LOCK_KEY = "arena:ratings:refit_lock"
REFIT_LOCK_MS = 120_000  # longer than any refit; it expires if its holder dies


def counts_from_rows(rows: Sequence[PairCount], models: list[str] | None = None) -> PairCounts:
    """elo's PairCounts from the archive's GROUP BY rows (each row's vote repeated n times,
    integer-coded: a million votes take milliseconds)."""
    models = models or sorted({row.model_a for row in rows} | {row.model_b for row in rows})
    index = {model: i for i, model in enumerate(models)}
    repeats = np.array([row.n for row in rows], dtype=np.intp)
    idx_a = np.repeat(np.array([index[row.model_a] for row in rows], dtype=np.intp), repeats)
    idx_b = np.repeat(np.array([index[row.model_b] for row in rows], dtype=np.intp), repeats)
    score_a = np.repeat(scores_for_a([row.winner for row in rows]) if rows else np.zeros(0),
                        repeats)
    return count_pairs_coded(idx_a, idx_b, score_a, len(models), models)


def style_fit(archive: Archive, rounds: int, seed: int = 0,
              anchor: str | None = DEFAULT_ANCHOR,
              without_flagged_voters: bool = True) -> StyleFit | None:
    """The style-controlled fit of the votes that count (None without any); flagged
    sessions' votes are left out unless kept."""
    keys, styles = archive.style_rows(without_flagged_voters)
    if not keys:
        return None
    models = sorted({a for a, _, _ in keys} | {b for _, b, _ in keys})
    index = {model: i for i, model in enumerate(models)}
    style = np.asarray(styles, dtype=np.float64)
    half = style.shape[1] // 2  # the a columns, then the b columns
    cells = style_cells(np.array([index[a] for a, _, _ in keys]),
                        np.array([index[b] for _, b, _ in keys]),
                        scores_for_a([w for _, _, w in keys]),
                        normalised_difference(style[:, :half], style[:, half:]), models)
    return bootstrap_style(cells, rounds=rounds, seed=seed, anchor=anchor)


def archive_counts(archive: Archive, flagged_votes: FlaggedVotes = "exclude",
                   flagged_weight: float = 0.1) -> PairCounts:
    """The pair counts of the votes that count, with the flagged sessions' votes left out,
    weighted by `flagged_weight`, or kept (feedback/voter_scores.py)."""
    if flagged_votes == "keep":
        return counts_from_rows(archive.pair_counts())
    kept = archive.pair_counts(flagged_voters=False)
    if flagged_votes == "exclude":
        return counts_from_rows(kept)
    flagged = archive.pair_counts(flagged_voters=True)
    models = sorted({r.model_a for r in kept + flagged} | {r.model_b for r in kept + flagged})
    full, light = counts_from_rows(kept, models), counts_from_rows(flagged, models)
    return PairCounts(models=models, wins=full.wins + flagged_weight * light.wins,
                      battles=full.battles + flagged_weight * light.battles,
                      ties=full.ties + flagged_weight * light.ties)


def refit_ratings(client: redis.Redis, archive: Archive, rounds: int, seed: int = 0,
                  anchor: str = DEFAULT_ANCHOR, flagged_votes: FlaggedVotes = "exclude",
                  flagged_weight: float = 0.1) -> BTFit | None:
    """Fit Bradley-Terry with bootstrap CIs on the archived votes that count and store it
    with a history point. None, and nothing stored, when there is nothing to fit, nothing
    changed since the stored fit, or another process is refitting right now."""
    holder = f"{os.getpid()}"
    if not client.set(REFIT_LOCK_KEY, holder, nx=True, px=REFIT_LOCK_MS):
        return None
    try:
        counts = archive_counts(archive, flagged_votes, flagged_weight)
        if counts.n_votes == 0:
            return None
        stored = client.get(PAIRS_KEY)
        if stored is not None and json.loads(stored) == json.loads(pair_counts_to_json(counts)):
            return None
        pinned = anchor if anchor in counts.models else None  # else: the mean is 1000
        result = bootstrap(counts, rounds=rounds, seed=seed, anchor=pinned)
        fit = BTFit.from_bootstrap(result, counts, pinned)
        save_fit(client, fit, counts)
        style = style_fit(archive, rounds, seed, pinned,
                          without_flagged_voters=flagged_votes != "keep")
        if style is not None:
            save_style_fit(client, style)
    finally:
        client.delete(REFIT_LOCK_KEY)
    ranked = sorted(fit.ratings.items(), key=lambda item: -item[1])
    log.info("ratings refit on %d votes: %s", fit.n_votes,
             ", ".join(f"{model} {rating:.0f}" for model, rating in ranked))
    return fit
