"""The version store: `settings.versions_dir/<id>`, one immutable folder per version.

Registering a checkpoint (the learner's output, or an adapter trained anywhere else) is:
copy into a staging folder of the store, check the copy (manifest hashes, then that the
adapter fits our base and servers), write its manifest, rename it into place (atomic: a
version folder is complete or absent; deploy/folders.py, as the learner writes its own),
then add the registry record as a `candidate`.
A refused checkpoint leaves nothing behind, and serving never sees it.

`register_adapter` does it all (the learner calls it). The gateway's admin route runs the
two halves itself, `stage` and `commit`, to load the adapter into the replicas in between.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.settings import Settings
from deploy.adapter_check import AdapterRefused, check_adapter, read_base_shape
from deploy.folders import allocate_id, clean_stale_temp, publish, temp_dir
from deploy.manifest import (
    Manifest,
    ManifestError,
    hash_folder,
    list_files,
    read_manifest,
    verify,
    write_manifest,
)
from deploy.registry import Registry, VersionRecord


@dataclass(frozen=True)
class StagedVersion:
    """A checked version folder in its final place, not yet in the registry."""

    id: str
    kind: Literal["policy", "reward"]
    path: Path
    manifest: Manifest


def stage(settings: Settings, registry: Registry, src_dir: Path | str,
          kind: Literal["policy", "reward"] = "policy", parent: str | None = None,
          metrics: dict[str, Any] | None = None) -> StagedVersion:
    """Copy `src_dir` into the store under a new id, checked; raise AdapterRefused if not."""
    src = allowed_source(settings, src_dir)
    if not src.is_dir():
        raise AdapterRefused("the path is not a folder on this host", "checkpoint_missing")
    try:
        source_manifest = read_manifest(src)
    except ManifestError as error:
        raise AdapterRefused(str(error), "checkpoint_corrupt") from error

    store = settings.versions_dir
    clean_stale_temp(store)  # left by a process killed while it staged
    with temp_dir(store, "stage") as staging:  # removed if anything below raises
        names = sorted(source_manifest.files) if source_manifest else list_files(src)
        _copy(src, staging, names)
        manifest = _checked_manifest(settings, staging, kind, source_manifest)
        manifest.parent = parent or manifest.parent or registry.current()
        manifest.metrics = metrics if metrics is not None else manifest.metrics
        version, final = _place(registry, store, staging, kind, manifest)
    return StagedVersion(id=version, kind=kind, path=final, manifest=manifest)


def allowed_source(settings: Settings, src_dir: Path | str) -> Path:
    """`src_dir` with symlinks resolved, if that lies in an allowed import root
    (`settings.allowed_import_roots`); else AdapterRefused("path_not_allowed"). Checked
    before anything else, so a refused path says nothing about what is there."""
    src = Path(src_dir).expanduser().resolve()
    if not any(src.is_relative_to(root) for root in settings.allowed_import_roots):
        roots = ", ".join(str(root) for root in settings.allowed_import_roots)
        raise AdapterRefused(f"the path resolves to {src}, outside the import roots ({roots}); "
                             "copy the checkpoint into one, or add its folder to "
                             "ARENA_IMPORT_ROOTS", "path_not_allowed")
    return src


def commit(registry: Registry, staged: StagedVersion, actor: str) -> VersionRecord:
    """Add the staged version's record, as a candidate: from now on it serves and battles."""
    record = VersionRecord(
        id=staged.id, kind=staged.kind, state="candidate", parent=staged.manifest.parent,
        path=str(staged.path), created_at=staged.manifest.created,
        metrics=staged.manifest.metrics, files=staged.manifest.files,
    )
    try:
        return registry.add(record, actor=actor)
    except BaseException:
        discard(staged)
        raise


def discard(staged: StagedVersion) -> None:
    """Remove a staged folder that will not be registered (its id is never reused)."""
    shutil.rmtree(staged.path, ignore_errors=True)


def register_adapter(settings: Settings, registry: Registry, src_dir: Path | str,
                     parent: str | None = None, metrics: dict[str, Any] | None = None,
                     actor: str = "learner") -> VersionRecord:
    """Register a peft LoRA folder as a new candidate policy `policy-vN` (see module doc)."""
    return commit(registry, stage(settings, registry, src_dir, "policy", parent, metrics), actor)


def register_reward_model(settings: Settings, registry: Registry, src_dir: Path | str,
                          parent: str | None = None, metrics: dict[str, Any] | None = None,
                          actor: str = "learner") -> VersionRecord:
    """Register a reward model folder as `rm-vN` (hash-checked; it is never served)."""
    return commit(registry, stage(settings, registry, src_dir, "reward", parent, metrics), actor)


# --- helpers -------------------------------------------------------------------------------
def _copy(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        source = src / name
        if not source.is_file():
            raise AdapterRefused(f"{name} is listed in the manifest but missing",
                                 "checkpoint_missing")
        if not source.resolve().is_relative_to(src):  # a symlink (or ..) out of the folder
            raise AdapterRefused(f"{name} resolves to {source.resolve()}, outside the "
                                 "checkpoint folder", "path_not_allowed")
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # fsynced by `publish`, before the rename


def _checked_manifest(settings: Settings, folder: Path, kind: str,
                      source: Manifest | None) -> Manifest:
    """Hashes of the copy (checked against the source's manifest if it has one), then the
    compatibility checks; returns the manifest the store folder will carry."""
    if source is not None:
        try:
            verify(folder, source)
        except ManifestError as error:
            raise AdapterRefused(f"checkpoint does not match its manifest: {error}",
                                 "checkpoint_corrupt") from error
    if kind == "policy":
        check_adapter(folder, read_base_shape(settings.base_model_path),
                      settings.vllm_max_lora_rank)
    if source is not None:
        return Manifest(files=dict(source.files), parent=source.parent,
                        metrics=dict(source.metrics), created=source.created,
                        extra=dict(source.extra))
    return Manifest(files=hash_folder(folder), created=time.time())


def _place(registry: Registry, store: Path, staging: Path, kind: Literal["policy", "reward"],
           manifest: Manifest) -> tuple[str, Path]:
    """Take a new id (the registry's atomic counter; a folder left by a crash under an
    unregistered id is skipped, never overwritten) and publish the staging folder as it."""
    version = allocate_id(store, kind, lambda: registry.next_id(kind))
    manifest.extra.update(id=version, kind=kind)
    write_manifest(staging, manifest)
    final = store / version
    publish(staging, final)
    return version, final.resolve()
