"""A small client of the operator API (serve/admin_routes.py), used by the `arena` CLI so
that it works against a remote gateway: URL from `settings.admin_url` (default the gateway's
host and port), token from `core.secrets.admin_token(settings)`."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import httpx

from core.secrets import admin_token
from core.settings import Settings

ACTOR_HEADER = "X-Arena-Actor"


class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def __str__(self) -> str:
        return f"{self.status} {self.code or 'error'}: {self.message}" if self.status \
            else self.message


def admin_url(settings: Settings) -> str:
    if settings.admin_url:
        return settings.admin_url.rstrip("/")
    host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::") else settings.gateway_host
    return f"http://{host}:{settings.gateway_port}"


class AdminClient:
    def __init__(self, base_url: str, token: str, actor: str | None = None,
                 timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if actor:
            headers[ACTOR_HEADER] = actor
        self.http = httpx.Client(base_url=base_url, headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=5.0))

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminClient:
        try:
            actor = getpass.getuser()
        except (OSError, KeyError):
            actor = None
        return cls(admin_url(settings), admin_token(settings), actor=actor)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict:
        try:
            response = self.http.request(method, path, json=json)
        except httpx.HTTPError as error:
            raise AdminError(0, f"gateway at {self.http.base_url} not reachable: {error}",
                             "unreachable") from error
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            raise AdminError(response.status_code, error["message"], error.get("code"))
        except (ValueError, KeyError, TypeError):
            raise AdminError(response.status_code, response.text[:500]) from None

    def versions(self) -> dict:
        return self._call("GET", "/admin/versions")

    def register(self, path: Path | str, parent: str | None = None,
                 kind: str = "policy") -> dict:
        body: dict[str, Any] = {"path": str(Path(path).expanduser().resolve()), "kind": kind}
        if parent:
            body["parent"] = parent
        return self._call("POST", "/admin/versions", body)

    def promote(self, version: str) -> dict:
        return self._call("POST", f"/admin/versions/{version}/promote")

    def rollback(self) -> dict:
        return self._call("POST", "/admin/rollback")

    def retire(self, version: str) -> dict:
        return self._call("POST", f"/admin/versions/{version}/retire")

    def learner(self) -> dict:
        return self._call("GET", "/admin/learner")

    def learner_action(self, action: str) -> dict:
        """pause, resume or cancel."""
        return self._call("POST", f"/admin/learner/{action}")

    def auto_promote_action(self, action: str) -> dict:
        """pause or resume."""
        return self._call("POST", f"/admin/auto-promote/{action}")
