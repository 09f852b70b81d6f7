"""Operator token and cookie-signing key: taken from the settings, else generated once into
the data dir (mode 0600) so every process of one deployment agrees on them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from arena.settings import Settings


def _secret_file(settings: Settings, name: str) -> Path:
    return settings.data_dir / "secrets" / name


def ensure_secret(settings: Settings, name: str) -> tuple[str, bool]:
    """Return (value, created_now) for the secret `name` ("admin_token" or "session_secret")."""
    configured = getattr(settings, name)
    if configured is not None:
        return configured.get_secret_value(), False
    path = _secret_file(settings, name)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # O_EXCL: if two processes race, one creates and the other reads the winner's value.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def admin_token(settings: Settings) -> str:
    return ensure_secret(settings, "admin_token")[0]


def session_secret(settings: Settings) -> str:
    return ensure_secret(settings, "session_secret")[0]
