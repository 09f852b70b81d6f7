"""The loop's decision on the learner's candidates (deploy/decision.py): the pure rule
(promote once the lower bound clears, wait, reject, sanity gate, roll back, nothing when
paused), and applying it against the real Redis: the registry changes exactly once per
decision, each with an audit line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from core.settings import Settings
from deploy.decision import (
    LEARNER_ACTOR,
    MAX_EMPTY_SHARE,
    Rating,
    Thresholds,
    apply_decisions,
    decide,
    load_decisions,
    pending,
    sanity_failures,
    set_auto_promote_paused,
)
from deploy.registry import Registry, VersionRecord
from elo.bradley_terry import PairCounts
from elo.ratings_store import BTFit, save_fit

ON = Thresholds(min_battles=150, max_battles=600, enabled=True)
PARENT_STATS = {"empty_share": 0.0, "cut_off_share": 0.25, "repetition": 0.1,
                "mean_length": 100.0}
GOOD_SANITY = {"empty_share": 0.0, "cut_off_share": 0.3, "repetition": 0.15,
               "mean_length": 140.0, "parent": PARENT_STATS}


def policy(version: str, created_by: str = LEARNER_ACTOR, state: str = "candidate",
           parent: str = "base", sanity: dict | None = None, **extra: object) -> VersionRecord:
    return VersionRecord(id=version, kind="policy", state=state, parent=parent,
                         created_by=created_by, created_at=time.time(),
                         metrics={"sanity": GOOD_SANITY if sanity is None else sanity},
                         **extra)


BASE_CURRENT = VersionRecord(id="base", kind="base", state="current", created_at=0.0)
BASE_ROW = Rating(1000.0, 1000.0, 1000.0, 2000)


def actions(decisions: list) -> list[tuple[str, str]]:
    return [(d.version, d.action) for d in decisions]


# --- the pure rule ---------------------------------------------------------------------------
def test_promote_when_the_lower_bound_clears_current() -> None:
    records = [BASE_CURRENT, policy("policy-v1")]
    board = {"base": BASE_ROW, "policy-v1": Rating(1040.0, 1001.0, 1080.0, 150)}
    [decision] = decide(board, records, "base", {}, ON)
    assert (decision.version, decision.action) == ("policy-v1", "promote")
    assert decision.rating == board["policy-v1"] and "1001.0" in decision.reason
    # a bound that only touches the current rating is not enough
    board["policy-v1"] = Rating(1040.0, 1000.0, 1080.0, 150)
    assert decide(board, records, "base", {}, ON) == []


def test_wait_below_min_battles_even_when_the_bound_clears() -> None:
    records = [BASE_CURRENT, policy("policy-v1")]
    board = {"base": BASE_ROW, "policy-v1": Rating(1100.0, 1050.0, 1150.0, 149)}
    assert decide(board, records, "base", {}, ON) == []
    assert decide({"base": BASE_ROW}, records, "base", {}, ON) == []  # not rated yet


def test_reject_after_max_battles_without_qualifying() -> None:
    records = [BASE_CURRENT, policy("policy-v1")]
    board = {"base": BASE_ROW, "policy-v1": Rating(1010.0, 990.0, 1030.0, 599)}
    assert decide(board, records, "base", {}, ON) == []  # still waiting
    board["policy-v1"] = Rating(1010.0, 990.0, 1030.0, 600)
    [decision] = decide(board, records, "base", {}, ON)
    assert (decision.version, decision.action) == ("policy-v1", "reject")
    assert decision.reason.startswith("rejected") and "600 votes" in decision.reason


def test_reject_early_when_confidently_worse_than_current() -> None:
    records = [BASE_CURRENT, policy("policy-v1")]
    board = {"base": BASE_ROW, "policy-v1": Rating(940.0, 900.0, 999.0, 149)}
    assert decide(board, records, "base", {}, ON) == []  # too few votes yet
    board["policy-v1"] = Rating(940.0, 900.0, 999.0, 150)
    [decision] = decide(board, records, "base", {}, ON)
    assert (decision.version, decision.action) == ("policy-v1", "reject")
    assert "upper bound 999.0 below base's rating 1000.0 after 150 votes" in decision.reason
    board["policy-v1"] = Rating(960.0, 910.0, 1000.0, 150)  # touching is not enough
    assert decide(board, records, "base", {}, ON) == []


def test_reject_on_a_failed_sanity_gate_at_once() -> None:
    broken = {**GOOD_SANITY, "empty_share": 0.5}
    records = [BASE_CURRENT, policy("policy-v1", sanity=broken)]
    board = {"base": BASE_ROW, "policy-v1": Rating(1200.0, 1150.0, 1250.0, 10)}
    [decision] = decide(board, records, "base", {}, ON)
    assert (decision.version, decision.action) == ("policy-v1", "reject")
    assert "sanity" in decision.reason and "50% empty" in decision.reason
    # ... and a failed gate is never promoted, however good the rating
    board["policy-v1"] = Rating(1200.0, 1150.0, 1250.0, 5000)
    assert actions(decide(board, records, "base", {}, ON)) == [("policy-v1", "reject")]


@pytest.mark.parametrize("change, words", [
    ({"empty_share": MAX_EMPTY_SHARE + 0.01}, "empty"),
    ({"cut_off_share": 0.25 + 0.3 + 0.01}, "cut off"),
    ({"repetition": 0.1 + 0.2 + 0.01}, "3-gram"),
    ({"mean_length": 2.5 * 100.0 + 1}, "mean length"),
])
def test_sanity_gate_rules(change: dict, words: str) -> None:
    assert sanity_failures(GOOD_SANITY) == []
    assert sanity_failures({**GOOD_SANITY, "empty_share": MAX_EMPTY_SHARE}) == []  # at the edge
    [failure] = sanity_failures({**GOOD_SANITY, **change})
    assert words in failure
    assert sanity_failures(None) == []  # not measured: nothing to hold against it


def test_sanity_gate_never_holds_a_candidate_to_a_stricter_standard_than_the_base() -> None:
    """A parent that ends more answers than the base: a child cut off as often as the base is
    not broken (the loop's iteration 2 was refused so: 75 % cut off, parent 44 %, base 69 %)."""
    child = {**GOOD_SANITY, "cut_off_share": 0.75,
             "parent": {**PARENT_STATS, "cut_off_share": 0.44}}
    assert "cut off" in sanity_failures(child)[0]  # against the parent alone
    with_base = {**child, "base": {**PARENT_STATS, "cut_off_share": 0.69}}
    assert sanity_failures(with_base) == []
    # the floor lifts the reference, never lowers it: a base below the parent changes nothing
    assert sanity_failures({**child, "base": {**PARENT_STATS, "cut_off_share": 0.1}}) != []
    assert sanity_failures({**with_base, "cut_off_share": 0.69 + 0.3 + 0.01}) != []


def test_rollback_when_ratings_put_a_promoted_version_below_its_parent() -> None:
    promoted = policy("policy-v1", state="current", promoted_by="auto-promote",
                      promoted_at=time.time())
    records = [VersionRecord(id="base", kind="base", state="candidate", created_at=0.0),
               promoted]
    board = {"base": BASE_ROW, "policy-v1": Rating(970.0, 950.0, 999.0, 800)}
    [decision] = decide(board, records, "policy-v1", {"policy-v1": "promote"}, ON)
    assert (decision.version, decision.action) == ("policy-v1", "rollback")
    # overlapping intervals: no rollback
    board["policy-v1"] = Rating(990.0, 975.0, 1000.5, 800)
    assert decide(board, records, "policy-v1", {"policy-v1": "promote"}, ON) == []
    # an operator's promotion is the operator's to undo; a rollback happens once
    board["policy-v1"] = Rating(970.0, 950.0, 999.0, 800)
    by_hand = policy("policy-v1", state="current", promoted_by="alice", promoted_at=1.0)
    assert decide(board, [records[0], by_hand], "policy-v1", {}, ON) == []
    assert decide(board, records, "policy-v1", {"policy-v1": "rollback"}, ON) == []


def test_nothing_when_paused_or_off() -> None:
    promoted = policy("policy-v1", state="current", promoted_by="auto-promote",
                      promoted_at=time.time())
    records = [VersionRecord(id="base", kind="base", state="candidate", created_at=0.0),
               promoted, policy("policy-v2", parent="policy-v1"),
               policy("policy-v3", parent="policy-v1", sanity={"empty_share": 1.0})]
    board = {"base": BASE_ROW, "policy-v1": Rating(970.0, 950.0, 999.0, 800),
             "policy-v2": Rating(1100.0, 1050.0, 1150.0, 700)}
    assert decide(board, records, "policy-v1", {}, ON) != []
    assert decide(board, records, "policy-v1", {}, Thresholds(150, 600, enabled=False)) == []


def test_only_undecided_learner_candidates_are_judged_best_promoted() -> None:
    records = [BASE_CURRENT,
               policy("policy-v1", created_by="admin@127.0.0.1"),  # an operator's adapter
               policy("policy-v2"), policy("policy-v3"),
               policy("policy-v4"),  # decided already
               policy("policy-v5", promoted_at=1.0)]  # was current once: not new
    good = Rating(1100.0, 1020.0, 1180.0, 300)
    board = {"base": BASE_ROW, "policy-v1": Rating(1300.0, 1250.0, 1350.0, 900),
             "policy-v2": good, "policy-v3": Rating(1090.0, 1040.0, 1140.0, 300),
             "policy-v4": good, "policy-v5": good}
    assert actions(decide(board, records, "base", {"policy-v4": "reject"}, ON)) == [
        ("policy-v3", "promote")]  # the surest of the two that qualify


# --- applied against Redis ---------------------------------------------------------------------
def store_fit(client: redis.Redis, rows: dict[str, Rating]) -> None:
    models = sorted(rows)
    zeros = np.zeros((len(models), len(models)))
    fit = BTFit(ratings={m: r.rating for m, r in rows.items()},
                lower={m: r.lower for m, r in rows.items()},
                upper={m: r.upper for m, r in rows.items()},
                battles={m: r.battles for m, r in rows.items()},
                win_rate_vs_base={m: None for m in rows}, anchor="base",
                n_votes=sum(r.battles for r in rows.values()) // 2, rounds=20, ci=0.95,
                fitted_at=time.time())
    save_fit(client, fit, PairCounts(models, zeros, zeros.copy(), zeros.copy()))


def audit_lines(settings: Settings) -> list[dict]:
    path: Path = settings.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_apply_decisions_changes_the_registry_once_with_audit_lines(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.effective_redis_url)
    registry = Registry(client, settings.data_dir / "audit.log")
    registry.ensure_base()
    assert settings.auto_promote is True  # the loop's default
    for record in (policy("policy-v1"), policy("policy-v2", sanity={"empty_share": 0.9}),
                   policy("policy-v3", created_by=None)):
        registry.add(record, actor=record.created_by or "alice")
    assert registry.get("policy-v3").created_by == "alice"
    assert pending(client, registry) == ["policy-v1", "policy-v2"]
    store_fit(client, {"base": BASE_ROW, "policy-v1": Rating(1060.0, 1012.0, 1100.0, 200),
                       "policy-v2": Rating(900.0, 850.0, 950.0, 20),
                       "policy-v3": Rating(1200.0, 1150.0, 1250.0, 900)})

    applied = apply_decisions(client, registry, settings)
    assert sorted(actions(applied)) == [("policy-v1", "promote"), ("policy-v2", "reject")]
    v1, v2, v3 = (registry.get(f"policy-v{i}") for i in (1, 2, 3))
    assert registry.current() == "policy-v1"
    assert (v1.state, v1.promoted_by) == ("current", "auto-promote")
    assert v2.state == "retired" and v3.state == "candidate"  # an operator's: not the loop's
    decisions = load_decisions(client)
    assert decisions["policy-v1"]["decision"] == "promote"
    assert decisions["policy-v1"]["lower"] == 1012.0 and decisions["policy-v1"]["battles"] == 200
    assert decisions["policy-v2"]["reason"].startswith("rejected")
    lines = audit_lines(settings)
    promote = [line for line in lines if line["action"] == "promote"]
    retire = [line for line in lines if line["action"] == "retire"]
    assert [(p["version"], p["actor"]) for p in promote] == [("policy-v1", "auto-promote")]
    assert [(r["version"], r["actor"]) for r in retire] == [("policy-v2", "loop")]
    assert retire[0]["reason"].startswith("rejected: sanity")
    assert pending(client, registry) == []

    # Once: the same board again changes nothing, and writes nothing.
    assert apply_decisions(client, registry, settings) == []
    assert len(audit_lines(settings)) == len(lines)

    # Later votes put policy-v1 below its parent: rolled back, once.
    store_fit(client, {"base": BASE_ROW, "policy-v1": Rating(975.0, 955.0, 995.0, 900)})
    assert actions(apply_decisions(client, registry, settings)) == [("policy-v1", "rollback")]
    assert registry.current() == "base" and registry.get("policy-v1").state == "candidate"
    assert load_decisions(client)["policy-v1"]["decision"] == "rollback"
    rollback = [line for line in audit_lines(settings) if line["action"] == "rollback"]
    assert [(r["version"], r["actor"]) for r in rollback] == [("base", "loop")]
    assert apply_decisions(client, registry, settings) == []

    # Paused: a qualifying candidate waits; resumed: promoted.
    registry.add(policy("policy-v4"), actor=LEARNER_ACTOR)
    store_fit(client, {"base": BASE_ROW, "policy-v4": Rating(1080.0, 1030.0, 1130.0, 400)})
    set_auto_promote_paused(client, True)
    assert apply_decisions(client, registry, settings) == []
    assert registry.current() == "base" and pending(client, registry) == ["policy-v4"]
    set_auto_promote_paused(client, False)
    assert actions(apply_decisions(client, registry, settings)) == [("policy-v4", "promote")]

