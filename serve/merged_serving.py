"""Which version runs on merged weights, and where: one Redis key, written by the merged-replica
manager (serve/merged_replica.py) once its replica answers, read by the gateway per request
(serve/versions.py) to send that version's requests there first."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

MERGED_KEY = "arena:serving:merged"


@dataclass(frozen=True)
class MergedServing:
    version: str  # the policy version whose merged weights the replica serves, under this name
    url: str
    pid: int  # the replica's process (its own process group), for a manager that restarted
    since: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> MergedServing | None:
        if raw is None:
            return None
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None
