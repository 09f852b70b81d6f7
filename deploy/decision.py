"""The loop's decision: what becomes of a candidate the learner made, once the arena has
rated it. Made after every Bradley-Terry refit (arena/consumers.py's periodic loop calls
`apply_decisions`), from the stored fit and the registry; it never talks to vLLM: the
gateway's replica sync keeps every live version loaded, and a candidate with enough votes to
be decided on has been served.

The rule (`decide`, pure), with `current` the version the alias points at:

    ROLLBACK  current    current was promoted by auto-promotion and its upper bound is below
                         its parent's lower bound (ratings later put it below its parent)
    REJECT    C          C's sanity gate failed (`sanity_failures`), or C has
                         >= loop_min_battles votes and C.upper < current.rating (the
                         arena is confident it is worse: the promotion rule's mirror), or
                         >= loop_max_battles votes without qualifying; C is retired
    PROMOTE   C          C has >= loop_min_battles votes, C.lower > current.rating and its
                         sanity gate passed; of several, the one with the highest lower bound
    (wait)               otherwise

Only *pending* candidates are decided: policies the learner registered (created_by
"learner"), still `candidate`, never current, with no decision recorded yet. Each is decided
once: the decision is claimed in the hash `arena:loop:decisions` (version -> JSON {decision,
ts, reason, rating, lower, upper, battles}) before the registry changes, and the registry
writes the audit line (actor "auto-promote" for a promotion, "loop" otherwise). With
auto-promotion off (setting `auto_promote`) or paused (`arena:loop:auto_promote_paused`,
`arena auto-promote pause`) nothing is decided: an operator promotes or retires the candidate.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from core.settings import Settings
from core.text import as_str
from deploy.registry import Registry, UnknownVersion, VersionRecord
from deploy.states import TransitionError
from elo.ratings_store import BTFit, load_fit

log = logging.getLogger("arena.deploy.decision")

DECISIONS_KEY = "arena:loop:decisions"
AUTO_PROMOTE_PAUSED_KEY = "arena:loop:auto_promote_paused"
LEARNER_ACTOR = "learner"  # the registry's created_by of the learner's versions
PROMOTE_ACTOR = "auto-promote"
LOOP_ACTOR = "loop"
REJECTED = "rejected"

# The sanity gate (metrics["sanity"] of a learner candidate, learner/sanity.py): a candidate
# fails when any of these holds, compared with its parent on the same prompts.
MAX_EMPTY_SHARE = 0.2  # more than 20 % empty answers
MAX_CUT_OFF_RISE = 0.3  # cut-off share (no EOS) above the parent's + 0.3
MAX_REPETITION_RISE = 0.2  # repeated 3-gram share above the parent's + 0.2
MAX_LENGTH_RATIO = 2.5  # mean answer length above 2.5 x the parent's

Action = Literal["promote", "reject", "rollback"]


@dataclass(frozen=True)
class Rating:
    """One version on the Bradley-Terry board."""

    rating: float
    lower: float
    upper: float
    battles: int = 0


@dataclass(frozen=True)
class Thresholds:
    min_battles: int
    max_battles: int
    enabled: bool  # auto-promotion on and not paused

    @classmethod
    def from_settings(cls, settings: Settings, paused: bool) -> Thresholds:
        return cls(settings.loop_min_battles, settings.loop_max_battles,
                   settings.auto_promote and not paused)


@dataclass(frozen=True)
class Decision:
    version: str
    action: Action
    reason: str
    rating: Rating | None = None

    def to_record(self, ts: float) -> dict[str, Any]:
        row = self.rating
        return {"decision": self.action, "ts": ts, "reason": self.reason,
                "rating": row.rating if row else None, "lower": row.lower if row else None,
                "upper": row.upper if row else None, "battles": row.battles if row else 0}


# --- the rule (pure) ---------------------------------------------------------------------
def sanity_failures(sanity: Mapping[str, Any] | None) -> list[str]:
    """Why a candidate's answers on the sanity prompts are broken ([] = the gate passed; no
    measurement counts as passed). `sanity` holds the candidate's stats and, under "parent",
    its parent's."""
    if not sanity:
        return []
    # The reference is the parent, but never stricter than the base: a parent that ends more
    # of its answers than the base did must not make a child at the base's level "broken".
    parent = dict(sanity.get("parent") or {})
    for key, value in (sanity.get("base") or {}).items():
        if key in ("cut_off_share", "repetition", "mean_length") and key in parent:
            parent[key] = max(parent[key], value)
    failures = []
    if sanity.get("empty_share", 0.0) > MAX_EMPTY_SHARE:
        failures.append(f"{sanity['empty_share']:.0%} empty answers (max {MAX_EMPTY_SHARE:.0%})")
    if "cut_off_share" in parent and (
            sanity.get("cut_off_share", 0.0) > parent["cut_off_share"] + MAX_CUT_OFF_RISE):
        failures.append(f"{sanity['cut_off_share']:.0%} answers cut off (parent "
                        f"{parent['cut_off_share']:.0%}, max +{MAX_CUT_OFF_RISE:.0%})")
    if "repetition" in parent and (
            sanity.get("repetition", 0.0) > parent["repetition"] + MAX_REPETITION_RISE):
        failures.append(f"repeated 3-gram share {sanity['repetition']:.2f} (parent "
                        f"{parent['repetition']:.2f}, max +{MAX_REPETITION_RISE})")
    if parent.get("mean_length", 0.0) > 0 and (
            sanity.get("mean_length", 0.0) > MAX_LENGTH_RATIO * parent["mean_length"]):
        failures.append(f"mean length {sanity['mean_length']:.0f} chars (parent "
                        f"{parent['mean_length']:.0f}, max x{MAX_LENGTH_RATIO})")
    return failures


def beats(candidate: Rating | None, current: Rating | None) -> bool:
    """The arena is confident the candidate is better: its lower bound is above the current
    version's rating."""
    return candidate is not None and current is not None and candidate.lower > current.rating


def loses(candidate: Rating | None, current: Rating | None) -> bool:
    """The arena is confident the candidate is worse: its upper bound is below the current
    version's rating (the mirror of `beats`)."""
    return candidate is not None and current is not None and candidate.upper < current.rating


def pending_candidates(records: Sequence[VersionRecord],
                       decided: Collection[str]) -> list[VersionRecord]:
    """Learner-made policies waiting for a decision (module doc)."""
    return [r for r in records
            if r.kind == "policy" and r.state == "candidate" and r.created_by == LEARNER_ACTOR
            and r.promoted_at is None and r.id not in decided]


def decide(board: Mapping[str, Rating], records: Sequence[VersionRecord], current: str,
           decided: Mapping[str, str], thresholds: Thresholds) -> list[Decision]:
    """The decisions to apply now (module doc). `decided` maps a version to the action
    already recorded for it. A rollback comes alone: candidates are then judged against
    the new current at the next refit."""
    if not thresholds.enabled:
        return []
    by_id = {r.id: r for r in records}
    now = by_id.get(current)
    if (now is not None and now.promoted_by == PROMOTE_ACTOR and now.parent is not None
            and decided.get(current) != "rollback"):
        mine, parent = board.get(current), board.get(now.parent)
        if mine is not None and parent is not None and mine.upper < parent.lower:
            return [Decision(current, "rollback",
                             f"upper bound {mine.upper:.1f} is below its parent {now.parent}'s "
                             f"lower bound {parent.lower:.1f}", mine)]

    decisions: list[Decision] = []
    qualified: list[tuple[str, Rating]] = []
    for record in pending_candidates(records, decided):
        row = board.get(record.id)
        battles = row.battles if row is not None else 0
        failures = sanity_failures(record.metrics.get("sanity"))
        if failures:
            decisions.append(Decision(record.id, "reject",
                                      f"{REJECTED}: sanity gate failed: {'; '.join(failures)}",
                                      row))
        elif battles >= thresholds.min_battles and beats(row, board.get(current)):
            qualified.append((record.id, row))
        elif battles >= thresholds.min_battles and loses(row, board.get(current)):
            decisions.append(Decision(record.id, "reject",
                                      f"{REJECTED}: upper bound {row.upper:.1f} below "
                                      f"{current}'s rating {board[current].rating:.1f} after "
                                      f"{battles} votes", row))
        elif battles >= thresholds.max_battles:
            bar = board.get(current)
            versus = (f"lower bound {row.lower:.1f} not above {current}'s rating "
                      f"{bar.rating:.1f}" if row is not None and bar is not None
                      else f"{current} has no rating")
            decisions.append(Decision(record.id, "reject",
                                      f"{REJECTED}: not better than {current} after {battles} "
                                      f"votes ({versus})", row))
    if qualified:
        version, row = max(qualified, key=lambda item: (item[1].lower, item[0]))
        decisions.append(Decision(version, "promote",
                                  f"lower bound {row.lower:.1f} above {current}'s rating "
                                  f"{board[current].rating:.1f} after {row.battles} votes", row))
    return decisions


def board_from_fit(fit: BTFit | None) -> dict[str, Rating]:
    if fit is None:
        return {}
    return {m: Rating(fit.ratings[m], fit.lower[m], fit.upper[m], fit.battles.get(m, 0))
            for m in fit.ratings if m in fit.lower and m in fit.upper}


# --- state in Redis ----------------------------------------------------------------------
def load_decisions(client: redis.Redis) -> dict[str, dict[str, Any]]:
    return {as_str(k): json.loads(v) for k, v in client.hgetall(DECISIONS_KEY).items()}


def auto_promote_paused(client: redis.Redis) -> bool:
    return bool(client.exists(AUTO_PROMOTE_PAUSED_KEY))


def set_auto_promote_paused(client: redis.Redis, paused: bool) -> None:
    if paused:
        client.set(AUTO_PROMOTE_PAUSED_KEY, json.dumps({"ts": time.time()}))
    else:
        client.delete(AUTO_PROMOTE_PAUSED_KEY)


def pending(client: redis.Redis, registry: Registry) -> list[str]:
    """Ids of the learner's candidates waiting for a decision."""
    return [r.id for r in pending_candidates(registry.all(), set(load_decisions(client)))]


# Claim a decision: promote/reject only for a version with none recorded, rollback only for
# one not rolled back yet. Returns the previous record ('' for none), nil if not claimed.
_CLAIM = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if previous then
  if ARGV[3] ~= 'rollback' or cjson.decode(previous)['decision'] == 'rollback' then
    return false
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return previous or ''
"""


def apply_decisions(client: redis.Redis, registry: Registry, settings: Settings,
                    now: float | None = None) -> list[Decision]:
    """Decide on the stored fit and apply each decision once; returns those applied."""
    decided = {version: row.get("decision", "") for version, row in load_decisions(client).items()}
    decisions = decide(board_from_fit(load_fit(client)), registry.all(), registry.current(),
                       decided, Thresholds.from_settings(settings, auto_promote_paused(client)))
    claim = client.register_script(_CLAIM)
    applied = []
    for decision in decisions:
        record = json.dumps(decision.to_record(time.time() if now is None else now))
        previous = claim(keys=[DECISIONS_KEY], args=[decision.version, record, decision.action])
        if previous is None:
            continue  # decided by another process meanwhile
        try:
            _apply(registry, decision)
        except (TransitionError, UnknownVersion) as error:
            # An operator acted first (promoted, retired): forget the claim, judge again.
            if previous:
                client.hset(DECISIONS_KEY, decision.version, previous)
            else:
                client.hdel(DECISIONS_KEY, decision.version)
            log.warning("loop: could not %s %s: %s", decision.action, decision.version, error)
            continue
        log.info("loop: %s %s: %s", decision.action, decision.version, decision.reason)
        applied.append(decision)
    return applied


def _apply(registry: Registry, decision: Decision) -> None:
    if decision.action == "promote":
        registry.promote(decision.version, actor=PROMOTE_ACTOR, reason=decision.reason)
    elif decision.action == "reject":
        registry.retire(decision.version, actor=LOOP_ACTOR, reason=decision.reason)
    else:
        registry.rollback(actor=LOOP_ACTOR, reason=f"{decision.version}: {decision.reason}",
                          expected_current=decision.version)


