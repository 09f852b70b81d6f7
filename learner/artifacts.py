"""The learner's versions on disk: `<versions dir>/policy-vN` and `<versions dir>/rm-vN`.

Each is written as deploy/folders.py writes every version (a hidden temp folder renamed into
place, complete or absent, under a name never reused), with its manifest (the sha256 of every
file, and the learner's keys: task id, data range, hyper-parameters, metrics, history)
written last. Here: the manifest in the learner's terms, the published versions and the
task that wrote each, and the per-task work folders (`.work/<task id>`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deploy import manifest as manifest_file
from deploy.folders import VERSION_RE
from deploy.manifest import Manifest, ManifestError, hash_folder

WORK_DIR = ".work"  # resumable per-task state (checkpoints), one folder per Celery task id


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json last (deploy/manifest.py's format, the learner's keys kept), with
    the sha256 of every other file in `folder`."""
    record = Manifest.from_dict({**manifest, "files": hash_folder(folder),
                                 "created": manifest.get("created_at", time.time()),
                                 "written_at": time.time()})
    manifest_file.write_manifest(folder, record)
    return record.to_dict()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as a dict (FileNotFoundError without one, ManifestError if unreadable)."""
    record = manifest_file.read_manifest(folder)
    if record is None:
        raise FileNotFoundError(f"no {manifest_file.MANIFEST_NAME} in {folder}")
    return record.to_dict()


def verify(folder: Path) -> bool:
    """A complete version: a manifest that lists exactly the folder's files, hashes matching."""
    try:
        record = manifest_file.read_manifest(folder)
    except (OSError, ManifestError):
        return False
    return record is not None and record.files == hash_folder(folder)


def _last_write(folder: Path) -> float:
    """When anything under `folder` (itself included) was last written, Unix seconds."""
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)


def remove_finished_work(versions_dir: Path, finished: Callable[[str, float], bool],
                         phases: Sequence[str] = ()) -> list[Path]:
    """Remove the `.work/<task id>` folders (an iteration's are `<task id>-<phase>`) whose
    task `finished(task_id, idle_s)` says has ended; idle_s is the time since anything in
    the folder was written. Returns the folders removed."""
    work = versions_dir / WORK_DIR
    removed: list[Path] = []
    if not work.is_dir():
        return removed
    now = time.time()
    for folder in sorted(work.iterdir()):
        task_id = folder.name
        for phase in phases:
            task_id = task_id.removesuffix(f"-{phase}")
        try:
            idle_s = now - _last_write(folder)
        except FileNotFoundError:  # removed meanwhile (its task finished)
            continue
        if folder.is_dir() and finished(task_id, idle_s):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def list_versions(versions_dir: Path, kind: str) -> list[Path]:
    """Complete `policy-vN` or `rm-vN` folders, oldest (smallest N) first."""
    prefix = "policy" if kind == "policy" else "rm"
    found = []
    if versions_dir.is_dir():
        for p in versions_dir.iterdir():
            m = VERSION_RE.match(p.name)
            if m and m.group(1) == prefix and (p / manifest_file.MANIFEST_NAME).is_file():
                found.append((int(m.group(2)), p))
    return [p for _, p in sorted(found)]


def find_by_task(versions_dir: Path, kind: str, task_id: str) -> Path | None:
    """The published version a (re-delivered) task already wrote, if any."""
    for p in list_versions(versions_dir, kind):
        try:
            if read_manifest(p).get("task_id") == task_id:
                return p
        except (OSError, ValueError):
            continue
    return None
