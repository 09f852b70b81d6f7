"""Versioned artefacts on disk: `<versions dir>/policy-vN` and `<versions dir>/rm-vN`.

A version folder appears complete or not at all: its files are written into a hidden temp
folder in the same directory (`.tmp-<kind>-<pid>-<random>`), fsynced, the manifest (with
the sha256 of every file) written last, and the folder renamed into place (an atomic
`rename` on one file system). A process killed half-way leaves only a hidden temp folder,
removed by the next run (`clean_stale_temp`). Names are immutable: a version is never
rewritten under the same name.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy import manifest as manifest_file
from deploy.manifest import Manifest, ManifestError, hash_folder

TEMP_PREFIX = ".tmp-"
WORK_DIR = ".work"  # resumable per-task state (checkpoints), one folder per Celery task id
VERSION_RE = re.compile(r"^(policy|rm)-v(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, kind: str = "version") -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it is renamed to `final`.

    On an exception the temp folder is removed; on SIGKILL it stays hidden (`.tmp-…`) and
    `clean_stale_temp` removes it later. Raises FileExistsError if `final` exists."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f"{TEMP_PREFIX}{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        yield temp
        _fsync_tree(temp)
        if final.exists():
            raise FileExistsError(f"{final} exists; version names are immutable")
        os.rename(temp, final)  # atomic on one file system
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(versions_dir: Path) -> list[Path]:
    """Remove temp folders left by dead processes (a worker killed mid-write)."""
    removed = []
    if not versions_dir.is_dir():
        return removed
    for p in versions_dir.iterdir():
        if not p.name.startswith(TEMP_PREFIX):
            continue
        parts = p.name[len(TEMP_PREFIX):].split("-")
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue  # still being written by a live process
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


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


def allocate_id(versions_dir: Path, kind: str,
                next_id: Callable[[], str] | None = None) -> str:
    """A fresh `policy-vN` / `rm-vN`: from the registry's counter when given, else one above
    the highest on disk; never the name of an existing folder."""
    prefix = "policy" if kind == "policy" else "rm"
    while True:
        if next_id is not None:
            candidate = next_id()
        else:
            numbers = [int(m.group(2)) for p in versions_dir.glob(f"{prefix}-v*")
                       if (m := VERSION_RE.match(p.name))]
            candidate = f"{prefix}-v{max(numbers, default=0) + 1}"
        if not (versions_dir / candidate).exists():
            return candidate
