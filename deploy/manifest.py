"""A version folder's manifest (manifest.json): every file with its sha256, the parent version,
the training metrics and the creation time. Files are checked against it before any replica
loads them, and it is written atomically (temp file + rename) so it is never half there.

    {"files": {"adapter_model.safetensors": "<sha256>", ...}, "parent": "policy-v3",
     "metrics": {"reward": 0.41}, "created": 1764000000.0, ...}

Extra keys (a learner's training config, say) are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """The folder does not match its manifest (a file is missing or changed)."""


@dataclass
class Manifest:
    files: dict[str, str]  # path relative to the folder (POSIX) -> sha256 hex
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "files": self.files, "parent": self.parent,
                "metrics": self.metrics, "created": self.created}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        raw = dict(raw)
        files = raw.pop("files", None)
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ManifestError('manifest.json has no "files" map of file name -> sha256')
        for name in files:
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise ManifestError(f"manifest.json names a file outside its folder: {name!r}")
        return cls(files=files, parent=raw.pop("parent", None),
                   metrics=raw.pop("metrics", None) or {},
                   created=float(raw.pop("created", time.time())), extra=raw)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(folder: Path) -> list[str]:
    """The files a manifest covers: everything in the folder but the manifest itself."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME
    )


def hash_folder(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in list_files(folder)}


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ManifestError(f"manifest.json cannot be read: {error}") from error
    if not isinstance(raw, dict):
        raise ManifestError("manifest.json is not a JSON object")
    return Manifest.from_dict(raw)


def verify(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError unless every file of the manifest is in the folder, unchanged."""
    problems: list[str] = []
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected.lower():
            problems.append(f"{name} does not match its sha256 in the manifest (corrupt?)")
    if problems:
        raise ManifestError("; ".join(problems))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
