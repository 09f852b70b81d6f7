"""How a version folder comes into the store: complete or not at all, under a fresh name.

Its files are written into a hidden temp folder in the same directory
(`.tmp-<kind>-<host>-<pid>-<random>`), fsynced, and renamed into place (`publish`: an atomic
`rename` on one file system). While it is written its writer holds an exclusive `flock` on
the folder (`temp_dir`), which the kernel drops when the writer dies, however it dies. A
process killed half-way leaves only a hidden temp folder, removed by the next run on the same
host (`clean_stale_temp`) once no process holds its lock: a pid alone cannot say, since two
containers that share a hostname and the store but not a pid namespace see different
processes under one pid. A folder of another host's process is that host's to remove (its
pid means nothing here, and locks on a network file system are not to be trusted). Names are
immutable: a version is never rewritten under the same name (`allocate_id` skips names that
exist).

One implementation for every writer: the learner's versions and checkpoints
(learner/artifacts.py, learner/policy_trainer.py) and the store's imports (deploy/store.py).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TEMP_PREFIX = ".tmp-"
VERSION_RE = re.compile(r"^(policy|rm)-v(\d+)$")
# A temp folder this young is left alone even when unlocked: its writer (in another pid
# namespace) may be between creating it and locking it.
NEWBORN_S = 10.0


@contextmanager
def temp_dir(parent: Path, kind: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` named after this host and process, locked by this
    process until the block ends (it may be published, i.e. renamed, inside the block) and
    removed if the block raises (on SIGKILL it stays: `clean_stale_temp`)."""
    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_") or "host"
    temp = parent / f"{TEMP_PREFIX}{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    fd = os.open(temp, os.O_RDONLY)
    try:
        with suppress(OSError):  # a file system without flock: the cleaners go by the pid
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # still locked: no cleaner races us
        raise
    finally:
        os.close(fd)  # releases the lock


def publish(temp: Path, final: Path) -> None:
    """fsync `temp`'s files, then rename it to `final` (FileExistsError if that exists)."""
    _fsync_tree(temp)
    if final.exists():
        raise FileExistsError(f"{final} exists; version names are immutable")
    os.rename(temp, final)  # atomic on one file system
    _fsync_dir(final.parent)


@contextmanager
def atomic_dir(final: Path, kind: str = "version") -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it is published as `final`.

    On an exception the temp folder is removed; on SIGKILL it stays hidden (`.tmp-…`) and
    `clean_stale_temp` removes it later."""
    with temp_dir(final.parent, kind) as temp:
        yield temp
        publish(temp, final)


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove the temp folders in `folder` left by dead writers of this host (module doc)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    here = socket.gethostname().replace("-", "_") or "host"
    for p in folder.iterdir():
        if not p.name.startswith(TEMP_PREFIX):
            continue
        parts = p.name[len(TEMP_PREFIX):].split("-")  # kind, [host], pid, random
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        host = "-".join(parts[1:-2]) or here  # no host: written before names had one
        if host != here or (pid is not None and (pid == os.getpid() or _pid_alive(pid))):
            continue  # another host's, or still being written by a live process
        if _remove_unless_locked(p):
            removed.append(p)
    return removed


def allocate_id(folder: Path, kind: str, next_id: Callable[[], str] | None = None) -> str:
    """A fresh `policy-vN` / `rm-vN` (kind "policy", or "rm"/"reward"): from the registry's
    counter when given, else one above the highest in `folder`; never the name of an
    existing folder (one left by a crash under an unregistered id is skipped)."""
    prefix = "policy" if kind == "policy" else "rm"
    while True:
        if next_id is not None:
            candidate = next_id()
        else:
            numbers = [int(m.group(2)) for p in folder.glob(f"{prefix}-v*")
                       if (m := VERSION_RE.match(p.name))]
            candidate = f"{prefix}-v{max(numbers, default=0) + 1}"
        if not (folder / candidate).exists():
            return candidate


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


def _remove_unless_locked(temp: Path) -> bool:
    """Remove `temp` if no live process holds its lock (taking the lock first, so that no
    writer can start on it meanwhile) and it is not newborn; False if it is kept."""
    try:
        if time.time() - temp.stat().st_mtime < NEWBORN_S:
            return False
        fd = os.open(temp, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to read
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive (in a pid namespace this one cannot see)
        except OSError:
            pass  # no flock here: the dead pid is all there is to go on
        shutil.rmtree(temp, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
