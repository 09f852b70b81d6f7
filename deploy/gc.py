"""`arena gc`: what the data dir may shed. Every learner iteration leaves an adapter and a
reward model in the version store; a retired version never serves again (deploy/states.py),
so its weights can go, on an operator's request only.

Only retired versions are touched, and of those not one that a live version (current or
candidate) names as its parent: the loop compares a version with its parent, so the
parent stays loadable. The manifest.json stays (metrics, training history, file hashes):
the record, the audit log and the loop report keep the version's history; only the files
that hold its weights are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deploy.manifest import MANIFEST_NAME
from deploy.registry import Registry, VersionRecord


@dataclass
class GcPlan:
    removable: list[VersionRecord] = field(default_factory=list)  # retired, files there
    sizes: dict[str, int] = field(default_factory=dict)  # version id -> bytes of its weights
    kept: dict[str, str] = field(default_factory=dict)  # retired version id -> why kept

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]


def plan_gc(registry: Registry, versions_dir: Path) -> GcPlan:
    """Which retired versions' files may be removed, and why the others stay."""
    records = registry.all()
    live_children: dict[str, list[str]] = {}
    for record in records:
        if record.state != "retired" and record.parent:
            live_children.setdefault(record.parent, []).append(record.id)
    store = versions_dir.resolve()
    plan = GcPlan()
    for record in records:
        if record.state != "retired" or not record.path:
            continue
        folder = Path(record.path).resolve()
        if record.id in live_children:
            plan.kept[record.id] = f"parent of live {', '.join(live_children[record.id])}"
        elif not folder.is_relative_to(store) or folder == store:
            plan.kept[record.id] = f"{folder} is outside the version store {store}"
        elif files := _weight_files(folder):
            plan.removable.append(record)
            plan.sizes[record.id] = sum(p.stat().st_size for p in files)
    return plan


def remove_retired_files(registry: Registry, plan: GcPlan, actor: str) -> list[str]:
    """Delete the weight files of the plan's removable versions (each still retired when it
    is reached), keeping their manifests; one audit line each. Returns the versions done."""
    done = []
    for record in plan.removable:
        if registry.get(record.id).state != "retired":
            continue
        folder = Path(record.path or "")
        for path in _weight_files(folder):
            path.unlink(missing_ok=True)
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
            if not any(sub.iterdir()):  # emptied sub-folders (checkpoint shards and the like)
                sub.rmdir()
        registry.audit("gc", record.id, actor=actor, before="files",
                       after=f"manifest only ({plan.sizes.get(record.id, 0)} bytes freed)")
        done.append(record.id)
    return done
