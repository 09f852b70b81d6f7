"""The loop report: one static HTML page with PNG plots that shows whether the iterated online
RLHF loop is improving the model, built from what the loop already stores.

    arena report                                  -> <data dir>/report/index.html (+ *.png)
    arena report --evaluate --judge key_noun_noisy --prompts 50

Sources (read only): the rm-vN / policy-vN manifests under `settings.versions_dir`, the
Bradley-Terry fit and its history in Redis (elo/ratings_store.py), the version registry
(states) and the loop's decisions (Redis hash `arena:loop:decisions`, if any), and the
head-to-head evaluations in `<data dir>/loop/evaluations.jsonl` (crowd/evaluate.py).

Sections:
  1. Bradley-Terry rating of every version over time, with its 95 % bootstrap CI band
  2. reward-model held-out accuracy per iteration (Wilson 95 % interval on the held-out pairs)
  3. PPO reward and KL per step, one line per policy version
  4. head-to-head win rate of each version vs its parent and vs base, with 95 % CIs
  5. one table row per iteration: versions, data, metrics, wall time, state, decision

Every file is written to a temp name and renamed into place, so the gateway (GET /report)
never serves half a page. Building takes a few seconds of matplotlib: never on a request.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.text import as_str
from learner.artifacts import list_versions, read_manifest

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
RATINGS_PNG = "ratings.png"
RM_PNG = "rm_accuracy.png"
PPO_PNG = "ppo.png"
WIN_RATES_PNG = "win_rates.png"
PLOTS = (RATINGS_PNG, RM_PNG, PPO_PNG, WIN_RATES_PNG)
DECISIONS_KEY = "arena:loop:decisions"  # deploy/decision.py: version -> JSON {decision, ...}
BASE = "base"
Z95 = 1.959963984540054
DEFAULT_EVAL_PROMPTS = 50
RATING_AXIS_MARGIN = 25.0  # rating points above and below what the ratings plot must show


def report_dir(settings: Settings) -> Path:
    return settings.data_dir / REPORT_DIR


def evaluations_path(settings: Settings) -> Path:
    return settings.data_dir / "loop" / "evaluations.jsonl"


# --- what the report is made of --------------------------------------------------------------
@dataclass(frozen=True)
class RewardModelInfo:
    id: str
    created_at: float | None
    heldout_accuracy: float | None
    n_heldout: int | None
    n_train: int | None
    n_votes: int | None
    seconds: float | None  # training time


@dataclass(frozen=True)
class PolicyInfo:
    id: str
    parent: str | None
    rm_version: str | None
    created_at: float | None
    n_votes: int | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]  # one row per PPO step: step, reward, kl, ...


@dataclass(frozen=True)
class RatingSeries:
    """One version's Bradley-Terry rating at each refit it appears in (CI bounds are None
    for history points stored before the bounds were kept)."""

    ts: list[float]
    rating: list[float]
    lower: list[float | None]
    upper: list[float | None]


@dataclass(frozen=True)
class IterationRow:
    policy: str | None  # None: a reward model no policy was trained with (yet)
    parent: str | None
    rm: str | None
    n_votes: int | None
    rm_accuracy: float | None
    n_heldout: int | None
    reward_start: float | None
    reward_end: float | None
    kl_end: float | None
    wall_s: float | None  # RM training + (RM published -> policy published)
    since_previous_s: float | None  # policy published - previous policy published
    created_at: float | None
    state: str | None
    decision: str | None


@dataclass
class LoopData:
    reward_models: list[RewardModelInfo] = field(default_factory=list)
    policies: list[PolicyInfo] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # ratings history points
    fit: dict[str, Any] | None = None  # the latest BTFit as a dict
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # latest per pair+judge
    states: dict[str, str] = field(default_factory=dict)  # registry: version -> state
    decisions: dict[str, Any] = field(default_factory=dict)  # version -> decision (JSON)
    problems: list[str] = field(default_factory=list)  # what could not be read


# --- reading (I/O) ---------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


def reward_model_info(manifest: dict[str, Any]) -> RewardModelInfo:
    metrics = manifest.get("metrics") or {}
    data = manifest.get("data_range") or {}
    return RewardModelInfo(
        id=str(manifest["id"]), created_at=_number(manifest.get("created_at")),
        heldout_accuracy=_number(metrics.get("heldout_accuracy")),
        n_heldout=_count(metrics.get("n_heldout")), n_train=_count(metrics.get("n_train")),
        n_votes=_count(data.get("n_votes")), seconds=_number(metrics.get("seconds")))


def policy_info(manifest: dict[str, Any]) -> PolicyInfo:
    data = manifest.get("data_range") or {}
    return PolicyInfo(
        id=str(manifest["id"]), parent=manifest.get("parent"),
        rm_version=manifest.get("rm_version"),
        # learner manifests say created_at; versions registered by hand (deploy/) say created
        created_at=_number(manifest.get("created_at", manifest.get("created"))),
        n_votes=_count(data.get("n_votes")), metrics=manifest.get("metrics") or {},
        history=[row for row in manifest.get("history") or [] if isinstance(row, dict)])


def read_manifests(versions_dir: Path, kind: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifests of the complete `kind` versions, oldest first, and what was unreadable."""
    manifests, problems = [], []
    for folder in list_versions(versions_dir, kind):
        try:
            manifest = read_manifest(folder)
            manifest.setdefault("id", folder.name)
            manifests.append(manifest)
        except (OSError, ValueError) as error:
            problems.append(f"{folder.name}: unreadable manifest ({error})")
    return manifests, problems


def read_evaluations(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of evaluations.jsonl (none if the file is missing); bad lines are skipped
    and counted."""
    if not path.is_file():
        return [], []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and "model" in record and "against" in record:
            records.append(record)
        else:
            bad += 1
    problems = [f"{path.name}: {bad} unreadable line(s) skipped"] if bad else []
    return records, problems




def read_redis(client: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None,
                                     dict[str, str], dict[str, Any]]:
    """(ratings history, latest fit, registry states, loop decisions) from Redis."""
    from dataclasses import asdict

    from deploy.registry import Registry
    from elo.ratings_store import load_fit, load_history

    history = load_history(client)
    fit = load_fit(client)
    states = {record.id: record.state for record in Registry(client).all()}
    decisions: dict[str, Any] = {}
    for version, raw in client.hgetall(DECISIONS_KEY).items():
        try:
            decisions[as_str(version)] = json.loads(raw)
        except ValueError:
            decisions[as_str(version)] = as_str(raw)
    return history, asdict(fit) if fit else None, states, decisions


def collect(settings: Settings, client: Any = None) -> LoopData:
    """Everything the report shows. Redis being down costs the rating, state and decision
    parts (noted in `problems`), not the report."""
    import redis

    data = LoopData()
    rm_manifests, problems = read_manifests(settings.versions_dir, "rm")
    data.problems += problems
    policy_manifests, problems = read_manifests(settings.versions_dir, "policy")
    data.problems += problems
    data.reward_models = [reward_model_info(m) for m in rm_manifests]
    data.policies = [policy_info(m) for m in policy_manifests]
    records, problems = read_evaluations(evaluations_path(settings))
    data.problems += problems
    data.evaluations = latest_evaluations(records)
    own_client = client is None
    if own_client:
        client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=10)
    try:
        data.history, data.fit, data.states, data.decisions = read_redis(client)
    except redis.RedisError as error:
        data.problems.append(f"Redis not readable, no ratings/states/decisions: {error}")
    finally:
        if own_client:
            client.close()
    return data


# --- pure logic ------------------------------------------------------------------------------
def latest_evaluations(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record (by ts, then file order) per (model, against, judge)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        key = (str(record.get("model")), str(record.get("against")), str(record.get("judge")))
        old = latest.get(key)
        if old is None or (_number(record.get("ts")) or 0.0) >= (_number(old.get("ts")) or 0.0):
            latest[key] = record
    return list(latest.values())


def relation(model: str, against: str, parents: dict[str, str | None]) -> str:
    """How `against` relates to `model`: "base", "parent" or "other" (a policy trained from
    base plays base once; it counts as "base")."""
    if against == BASE:
        return "base"
    return "parent" if parents.get(model) == against else "other"


def relation_label(model: str, against: str, parents: dict[str, str | None]) -> str:
    rel = relation(model, against, parents)
    return "base = parent" if rel == "base" and parents.get(model) == BASE else rel


def rating_series(history: Iterable[dict[str, Any]]) -> dict[str, RatingSeries]:
    """Per version, its rating (and CI bounds where stored) at each history point."""
    series: dict[str, RatingSeries] = {}
    for point in history:
        lower, upper = point.get("lower") or {}, point.get("upper") or {}
        for version, rating in (point.get("ratings") or {}).items():
            s = series.setdefault(version, RatingSeries([], [], [], []))
            s.ts.append(float(point["ts"]))
            s.rating.append(float(rating))
            s.lower.append(_number(lower.get(version)))
            s.upper.append(_number(upper.get(version)))
    return dict(sorted(series.items(), key=lambda item: version_sort_key(item[0])))


def rating_axis(series: dict[str, RatingSeries],
                margin: float = RATING_AXIS_MARGIN) -> tuple[float, float]:
    """The rating plot's y range: every rating and each version's latest interval, plus a
    margin. The first refits of a new version have intervals hundreds of points wide; drawn
    in full they flatten every later difference into a line, so their bands are cut off."""
    values = [r for s in series.values() for r in s.rating]
    for s in series.values():
        values += [b for b in (s.lower[-1], s.upper[-1]) if b is not None]
    return min(values) - margin, max(values) + margin


def version_sort_key(version: str) -> tuple[int, str, int, str]:
    """base first, then policy-v1, policy-v2, ..., policy-v10 (numeric), then the rest."""
    m = re.match(r"^(.*?)-v(\d+)$", version)
    if version == BASE:
        return (0, "", 0, version)
    if m:
        return (1, m.group(1), int(m.group(2)), version)
    return (2, version, 0, version)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `p` observed on `n` trials."""
    if n <= 0:
        return (0.0, 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def decision_text(decision: Any) -> str | None:
    """One line for a loop decision as deploy/decision.py stores it: {"decision", "ts",
    "reason", ...}; anything else as compact JSON."""
    if decision is None:
        return None
    if isinstance(decision, dict) and decision.get("decision") is not None:
        text = str(decision["decision"])
        if (ts := _number(decision.get("ts"))) is not None:
            text += f" at {fmt_time(ts)}"
        return f"{text}: {decision['reason']}" if decision.get("reason") else text
    return json.dumps(decision, sort_keys=True, default=str)[:300]


def iteration_rows(reward_models: list[RewardModelInfo], policies: list[PolicyInfo],
                   states: dict[str, str], decisions: dict[str, Any]) -> list[IterationRow]:
    """One row per policy version, oldest first, then one per reward model no policy used."""
    rms = {rm.id: rm for rm in reward_models}
    rows: list[IterationRow] = []
    previous_created: float | None = None
    for policy in sorted(policies, key=lambda p: version_sort_key(p.id)):
        rm = rms.get(policy.rm_version or "")
        wall = None
        if rm is not None and rm.created_at is not None and policy.created_at is not None:
            wall = policy.created_at - rm.created_at + (rm.seconds or 0.0)
        since = (policy.created_at - previous_created
                 if policy.created_at is not None and previous_created is not None else None)
        previous_created = policy.created_at if policy.created_at is not None else previous_created
        rows.append(IterationRow(
            policy=policy.id, parent=policy.parent, rm=policy.rm_version,
            n_votes=policy.n_votes if policy.n_votes is not None or rm is None else rm.n_votes,
            rm_accuracy=(rm.heldout_accuracy if rm is not None
                         else _number(policy.metrics.get("rm_heldout_accuracy"))),
            n_heldout=rm.n_heldout if rm else None,
            reward_start=_number(policy.metrics.get("reward_start")),
            reward_end=_number(policy.metrics.get("reward_end")),
            kl_end=_number(policy.metrics.get("kl_end")), wall_s=wall,
            since_previous_s=since, created_at=policy.created_at,
            state=states.get(policy.id), decision=decision_text(decisions.get(policy.id))))
    used = {p.rm_version for p in policies}
    for rm in reward_models:
        if rm.id not in used:
            rows.append(IterationRow(
                policy=None, parent=None, rm=rm.id, n_votes=rm.n_votes,
                rm_accuracy=rm.heldout_accuracy, n_heldout=rm.n_heldout, reward_start=None,
                reward_end=None, kl_end=None, wall_s=rm.seconds, since_previous_s=None,
                created_at=rm.created_at, state=states.get(rm.id),
                decision=decision_text(decisions.get(rm.id))))
    return rows


def pending_evaluations(policies: list[PolicyInfo], evaluations: list[dict[str, Any]],
                        judge_labels: set[str], states: dict[str, str] | None = None
                        ) -> list[tuple[str, str]]:
    """(model, against) pairs still to evaluate under the judge: every policy version vs its
    parent and vs base, unless done already (under any of `judge_labels`) or one side is
    retired (not served, so it cannot answer)."""
    states = states or {}
    done = {(str(r.get("model")), str(r.get("against"))) for r in evaluations
            if str(r.get("judge")) in judge_labels}
    pending: list[tuple[str, str]] = []
    for policy in sorted(policies, key=lambda p: version_sort_key(p.id)):
        for against in dict.fromkeys(a for a in (policy.parent, BASE) if a):
            pair = (policy.id, against)
            if (against == policy.id or pair in done or pair in pending
                    or "retired" in (states.get(policy.id), states.get(against))):
                continue
            pending.append(pair)
    return pending


# --- formatting ------------------------------------------------------------------------------
def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "–"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def fmt_number(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.{digits}f}"


def fmt_percent(value: Any) -> str:
    number = _number(value)
    return "–" if number is None else f"{100 * number:.1f} %"


# --- plots (matplotlib, Agg, no pyplot state) -----------------------------------------------
def _plain_text(plot: Callable[..., Path]) -> Callable[..., Path]:
    """Draw every text as it is: a version or judge name with `$…$` in it is read from a
    file, and as mathtext it could fail the whole build (or draw something else)."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


@_plain_text
def plot_ratings(series: dict[str, RatingSeries], path: Path) -> Path:
    """Rating over time per version, with its 95 % CI as a band (and error bars at the last
    point, so a version fitted once still shows its interval)."""
    import matplotlib.dates as mdates

    fig = _figure(10, 4.8)
    ax = fig.add_subplot()
    for version, s in series.items():
        when = [datetime.fromtimestamp(t, UTC) for t in s.ts]
        (line,) = ax.plot(when, s.rating, marker="o", markersize=3, label=version)
        banded = [i for i in range(len(when))
                  if s.lower[i] is not None and s.upper[i] is not None]
        if banded:
            ax.fill_between([when[i] for i in banded], [s.lower[i] for i in banded],
                            [s.upper[i] for i in banded], color=line.get_color(), alpha=0.15,
                            linewidth=0)
            last = banded[-1]
            ax.errorbar([when[last]], [s.rating[last]],
                        yerr=[[s.rating[last] - s.lower[last]], [s.upper[last] - s.rating[last]]],
                        color=line.get_color(), capsize=4, linewidth=1.2)
    ax.set(title="Bradley–Terry rating per version, 95 % bootstrap CI (base = 1000)",
           ylabel="rating", xlabel="time of refit (UTC)")
    if series:
        ax.set_ylim(*rating_axis(series))
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


@_plain_text
def plot_rm_accuracy(reward_models: list[RewardModelInfo], path: Path) -> Path:
    """Held-out accuracy per reward model with its Wilson 95 % interval; the vote count above."""
    rms = [rm for rm in reward_models if rm.heldout_accuracy is not None]
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    xs = list(range(len(rms)))
    for x, rm in zip(xs, rms, strict=True):
        acc = rm.heldout_accuracy or 0.0
        low, high = wilson_interval(acc, rm.n_heldout) if rm.n_heldout else (acc, acc)
        ax.errorbar([x], [acc], yerr=[[acc - low], [high - acc]], fmt="o", color="tab:blue",
                    capsize=4)
        ax.annotate(f"{rm.n_votes if rm.n_votes is not None else '?'} votes\n"
                    f"{rm.n_heldout if rm.n_heldout is not None else '?'} held out",
                    (x, high), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.plot(xs, [rm.heldout_accuracy for rm in rms], color="tab:blue", alpha=0.4)
    ax.axhline(0.5, color="grey", ls=":", label="chance")
    ax.set_xticks(xs, [rm.id for rm in rms])
    ax.set(title="Reward model: held-out pairwise accuracy (Wilson 95 % CI)",
           ylabel="accuracy", ylim=(0, 1.15), xlim=(-0.6, max(len(rms), 1) - 0.4))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


@_plain_text
def plot_ppo(policies: list[PolicyInfo], path: Path) -> Path:
    """Rollout reward, KL(π‖π_ref) and the KL coefficient β per PPO step, one line per policy
    version."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(15, 4)
    ax_reward, ax_kl, ax_beta = fig.subplots(1, 3)
    for policy in policies:
        rows = [r for r in policy.history if _number(r.get("step")) is not None]
        steps = [r["step"] for r in rows]
        (line,) = ax_reward.plot(steps, [_number(r.get("reward")) for r in rows], marker="o",
                                 markersize=3, label=policy.id)
        ax_kl.plot(steps, [_number(r.get("kl")) for r in rows], marker="o", markersize=3,
                   color=line.get_color(), label=policy.id)
        ax_beta.plot(steps, [_number(r.get("kl_coef")) for r in rows], marker="o",
                     markersize=3, color=line.get_color(), label=policy.id)
        target = _number(policy.metrics.get("kl_target"))
        if target is not None:
            ax_kl.axhline(target, color=line.get_color(), ls="--", linewidth=0.8, alpha=0.6)
    ax_reward.set(title="PPO: mean rollout reward (normalised RM score)", xlabel="PPO step",
                  ylabel="reward")
    ax_kl.set(title="PPO: KL(π‖π_ref) per answer (dashed: target)", xlabel="PPO step",
              ylabel="nats")
    ax_beta.set(title="PPO: KL coefficient β (adaptive: toward the target)",
                xlabel="PPO step", ylabel="β")
    for ax in (ax_reward, ax_kl, ax_beta):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


@_plain_text
def plot_win_rates(evaluations: list[dict[str, Any]], parents: dict[str, str | None],
                   path: Path) -> Path:
    """Win rate of each version vs its parent and vs base (ties count half, as crowd/evaluate
    computes it), with its 95 % CI; one marker series per (opponent, judge)."""
    models = sorted({str(r["model"]) for r in evaluations}, key=version_sort_key)
    x_of = {model: i for i, model in enumerate(models)}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in evaluations:
        rel = relation(str(record["model"]), str(record["against"]), parents)
        groups.setdefault((rel, str(record.get("judge"))), []).append(record)
    offsets = {key: (i - (len(groups) - 1) / 2) * 0.12 for i, key in enumerate(sorted(groups))}
    markers = {"base": "s", "parent": "o", "other": "^"}
    fig = _figure(max(6.0, 1.2 * len(models) + 3), 4.2)
    ax = fig.add_subplot()
    for (rel, judge), records in sorted(groups.items()):
        xs, ys, low, high = [], [], [], []
        for r in records:
            rate = _number(r.get("win_rate"))
            if rate is None:
                continue
            xs.append(x_of[str(r["model"])] + offsets[(rel, judge)])
            ys.append(rate)
            low.append(max(0.0, rate - (_number(r.get("ci_low")) or rate)))
            high.append(max(0.0, (_number(r.get("ci_high")) or rate) - rate))
        label = f"vs {rel}" if rel != "other" else "vs another version"
        ax.errorbar(xs, ys, yerr=[low, high], fmt=markers[rel], capsize=4,
                    label=f"{label} ({judge})")
    ax.axhline(0.5, color="grey", ls=":", label="even")
    ax.set_xticks(range(len(models)), models)
    ax.set(title="Head-to-head win rate (95 % CI)", ylabel="win rate", ylim=(0, 1),
           xlim=(-0.6, max(len(models), 1) - 0.4))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


# --- HTML ------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("–" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list[Any]], numeric: Iterable[int]) -> str:
    """An HTML table; the `numeric` columns are right-aligned, every cell is escaped."""
    numeric = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="{"num" if i in numeric else "txt"}">{esc(cell)}</td>'
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _img(name: str | None, alt: str) -> str:
    return f'<p><img src="{esc(name)}" alt="{esc(alt)}"></p>' if name else ""


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.problems { background: #fff4e5; padding: 0.5em 1em; border-left: 4px solid #f0a020; }
"""


def _ratings_section(data: LoopData, plot: str | None) -> str:
    parts = ["<h2>1. Bradley–Terry ratings over time</h2>"]
    if not data.history and not data.fit:
        return parts[0] + "\n<p>No ratings yet: the ranker has not fitted any votes.</p>"
    parts.append(_img(plot, "Bradley–Terry rating per version over time"))
    fit = data.fit
    if fit:
        ratings = fit.get("ratings", {})
        rows = [[v, fmt_number(ratings[v], 1),
                 f"{fmt_number(fit['lower'].get(v), 1)} … {fmt_number(fit['upper'].get(v), 1)}",
                 fit.get("battles", {}).get(v, 0),
                 fmt_percent(fit.get("win_rate_vs_base", {}).get(v)), data.states.get(v)]
                for v in sorted(ratings, key=lambda v: -ratings[v])]
        parts.append(f'<p class="note">Latest fit: {esc(fmt_time(fit.get("fitted_at")))}, '
                     f'{esc(fit.get("n_votes"))} votes, {esc(fit.get("rounds"))} bootstrap '
                     f'rounds, anchor {esc(fit.get("anchor"))}.</p>')
        parts.append(_table(["version", "rating", "95 % CI", "battles", "win rate vs base",
                             "state"], rows, numeric=range(1, 5)))
    return "\n".join(parts)


def _rm_section(data: LoopData, plot: str | None) -> str:
    head = "<h2>2. Reward model: held-out accuracy per iteration</h2>"
    if not data.reward_models:
        return head + "\n<p>No reward model yet.</p>"
    rows = []
    for rm in data.reward_models:
        interval = (wilson_interval(rm.heldout_accuracy, rm.n_heldout)
                    if rm.heldout_accuracy is not None and rm.n_heldout else None)
        rows.append([rm.id, fmt_percent(rm.heldout_accuracy),
                     f"{fmt_percent(interval[0])} … {fmt_percent(interval[1])}"
                     if interval else "–",
                     rm.n_votes, rm.n_train, rm.n_heldout, fmt_duration(rm.seconds),
                     fmt_time(rm.created_at)])
    return "\n".join([head, _img(plot, "Reward-model held-out accuracy per iteration"),
                      _table(["reward model", "held-out accuracy", "Wilson 95 % CI", "votes",
                              "train pairs", "held-out pairs", "training time", "created"],
                             rows, numeric=range(1, 8))])


def _ppo_section(data: LoopData, plot: str | None) -> str:
    head = "<h2>3. PPO: reward and KL per step</h2>"
    if not any(p.history for p in data.policies):
        return head + "\n<p>No policy trained yet.</p>"
    return "\n".join([head, _img(plot, "PPO reward and KL per step for each policy version"),
                      '<p class="note">Reward: mean normalised reward-model score of the step\'s '
                      "rollouts. KL: per-answer KL(π‖π_ref) to the frozen base; dashed lines are "
                      "each run's KL target.</p>"])


def _evaluations_section(data: LoopData, plot: str | None) -> str:
    head = "<h2>4. Head-to-head win rates</h2>"
    if not data.evaluations:
        return (head + "\n<p>No evaluations yet. Run <code>arena report --evaluate --judge "
                "NAME</code> to play each version against its parent and base.</p>")
    parents = {p.id: p.parent for p in data.policies}
    records = sorted(data.evaluations, key=lambda r: (version_sort_key(str(r.get("model"))),
                                                      str(r.get("against")), str(r.get("judge"))))
    rows = [[r.get("model"), r.get("against"),
             relation_label(str(r.get("model")), str(r.get("against")), parents), r.get("judge"),
             r.get("n"), r.get("wins"), r.get("losses"), r.get("ties"), r.get("both_bad"),
             fmt_number(r.get("win_rate")),
             f"{fmt_number(r.get('ci_low'))} … {fmt_number(r.get('ci_high'))}",
             fmt_duration(_number(r.get("seconds"))), fmt_time(_number(r.get("ts")))]
            for r in records]
    return "\n".join([head, _img(plot, "Head-to-head win rate per version, 95 % CI"),
                      _table(["model", "against", "relation", "judge", "n", "wins", "losses",
                              "ties", "both bad", "win rate", "95 % CI", "time", "evaluated"],
                             rows, numeric=range(4, 13))])


def _iterations_section(rows: list[IterationRow]) -> str:
    head = "<h2>5. Iterations</h2>"
    if not rows:
        return head + "\n<p>No learner iteration has published anything yet.</p>"
    cells = [[r.policy or "(no policy)", r.parent, r.rm, r.n_votes,
              fmt_percent(r.rm_accuracy) + (f" of {r.n_heldout}" if r.n_heldout else ""),
              f"{fmt_number(r.reward_start)} → {fmt_number(r.reward_end)}",
              fmt_number(r.kl_end), fmt_duration(r.wall_s), fmt_duration(r.since_previous_s),
              fmt_time(r.created_at), r.state, r.decision]
             for r in rows]
    return "\n".join([
        head,
        _table(["policy", "parent", "reward model", "votes trained on", "RM held-out acc.",
                "PPO eval reward start → end", "KL end", "wall time", "since previous policy",
                "published", "state", "loop decision"], cells, numeric=range(3, 10)),
        '<p class="note">Wall time: reward-model training plus the time from the reward model\'s '
        "publication to the policy's. Reward start → end: the policy evaluated on the same "
        "prompts and seed before and after PPO.</p>"])


def render_html(data: LoopData, plots: dict[str, str | None], generated_at: float) -> str:
    """The page; `plots` maps each PNG name to itself when written, or to None."""
    rows = iteration_rows(data.reward_models, data.policies, data.states, data.decisions)
    problems = ""
    if data.problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in data.problems)
        problems = (f'<div class="problems"><p>Some of the data could not be read:</p>'
                    f"<ul>{items}</ul></div>")
    current = next((v for v, s in data.states.items() if s == "current"), None)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf-arena loop report</title>
<style>{STYLE}</style>
</head>
<body>
<h1>rlhf-arena: loop report</h1>
<p class="meta">Generated at {esc(fmt_time(generated_at))} · {esc(len(data.policies))} policy
version(s), {esc(len(data.reward_models))} reward model(s) · current: {esc(current)}</p>
{problems}
{_ratings_section(data, plots.get(RATINGS_PNG))}
{_rm_section(data, plots.get(RM_PNG))}
{_ppo_section(data, plots.get(PPO_PNG))}
{_evaluations_section(data, plots.get(WIN_RATES_PNG))}
{_iterations_section(rows)}
</body>
</html>
"""


# --- building --------------------------------------------------------------------------------
def write_plots(data: LoopData, out_dir: Path) -> dict[str, str | None]:
    """Write the PNGs that have data; remove those that have none (left from an earlier
    build). Returns {png name: name or None}."""
    parents = {p.id: p.parent for p in data.policies}
    series = rating_series(data.history)
    makers: dict[str, Callable[[Path], Path] | None] = {
        RATINGS_PNG: (lambda path: plot_ratings(series, path)) if series else None,
        RM_PNG: ((lambda path: plot_rm_accuracy(data.reward_models, path))
                 if any(rm.heldout_accuracy is not None for rm in data.reward_models) else None),
        PPO_PNG: ((lambda path: plot_ppo(data.policies, path))
                  if any(p.history for p in data.policies) else None),
        WIN_RATES_PNG: ((lambda path: plot_win_rates(data.evaluations, parents, path))
                        if data.evaluations else None),
    }
    written: dict[str, str | None] = {}
    for name, make in makers.items():
        path = out_dir / name
        if make is None:
            path.unlink(missing_ok=True)
            written[name] = None
        else:
            make(path)
            written[name] = name
    return written


def build_report(settings: Settings, out_dir: Path | None = None, client: Any = None) -> Path:
    """Write `<out dir>/index.html` (default `<data dir>/report`) and its PNGs; returns the
    index path. `client`: a redis-py client (default: one on the settings' Redis)."""
    out_dir = out_dir or report_dir(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(settings, client)
    plots = write_plots(data, out_dir)
    index = out_dir / INDEX
    tmp = out_dir / f".{INDEX}.tmp"
    tmp.write_text(render_html(data, plots, time.time()), encoding="utf-8")
    os.replace(tmp, index)
    return index


# --- evaluating the versions that have no evaluation yet ------------------------------------
def evaluate_missing(settings: Settings, judge_name: str, n_prompts: int | None = None,
                     progress: Callable[[str], None] | None = None
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """Play every policy version that has no evaluation under `judge_name` against its parent
    and base (crowd/evaluate.py) and record each result. Returns (results, errors): one pair
    failing (a version not being served, say) does not stop the others."""
    from crowd.evaluate import head_to_head, record_evaluation
    from crowd.judges import get_judge
    from crowd.prompts import load_prompts

    judge = get_judge(judge_name)
    prompts = load_prompts(which="heldout")
    if n_prompts is not None:
        prompts = prompts[:n_prompts]
    data = collect(settings)
    labels = {judge_name, getattr(judge, "__name__", judge_name)}
    results, errors = [], []
    say = progress or (lambda message: log.info("%s", message))
    for model, against in pending_evaluations(data.policies, data.evaluations, labels,
                                              data.states):
        say(f"evaluating {model} vs {against} on {len(prompts)} prompts ({judge_name})")
        try:
            result = head_to_head(settings, model, against, judge, prompts)
        except Exception as error:  # noqa: BLE001 - report it, go on with the other pairs
            errors.append(f"{model} vs {against}: {error}")
            say(f"  failed: {error}")
            continue
        record_evaluation(settings, result)
        results.append(result.to_dict())
        say(f"  win rate {fmt_number(results[-1].get('win_rate'))} "
            f"[{fmt_number(results[-1].get('ci_low'))}, "
            f"{fmt_number(results[-1].get('ci_high'))}]")
    return results, errors
