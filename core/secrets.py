"""Operator token and cookie-signing key: taken from the settings, else generated once into
the data dir (mode 0600) so every process of one deployment agrees on them.

A secret is never empty: the settings refuse an empty value (core/settings.py), and a file
is written whole (temporary file, then rename) so a crash cannot leave an empty one; an empty
file left by an older version is replaced by a fresh secret."""

from __future__ import annotations

import fcntl
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from core.settings import Settings


def _secret_file(settings: Settings, name: str) -> Path:
    return settings.data_dir / "secrets" / name


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _write_atomically(path: Path, value: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def ensure_secret(settings: Settings, name: str) -> tuple[str, bool]:
    """Return (value, created_now) for the secret `name` ("admin_token" or "session_secret")."""
    configured = getattr(settings, name)
    if configured is not None:
        return configured.get_secret_value(), False
    path = _secret_file(settings, name)
    if value := _read(path):
        return value, False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together take turns: the first writes, the others read its value.
    with (path.parent / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if value := _read(path):
            return value, False
        value = secrets.token_urlsafe(32)
        _write_atomically(path, value)
        return value, True


def admin_token(settings: Settings) -> str:
    return ensure_secret(settings, "admin_token")[0]


def session_secret(settings: Settings) -> str:
    return ensure_secret(settings, "session_secret")[0]


def bearer_matches(authorization: str, expected: str) -> bool:
    """Whether an Authorization header is `Bearer <expected>` (constant-time compare)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              expected.encode())
