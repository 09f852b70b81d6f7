"""Version records in Redis (durable with AOF) plus an append-only audit log file.

Keys:
  arena:versions          hash  id -> JSON record
  arena:current           string, the id the `current` alias resolves to
  arena:current:previous  list, earlier currents (head = most recent) for rollback: each id
                          once, retired ones dropped, at most PREVIOUS_LIMIT
  arena:versions:seq      counter for policy-vN / rm-vN ids

Every change runs in one Redis transaction (WATCH/MULTI) so concurrent gateways and the
learner never see two currents, and is then appended to <data dir>/audit.log.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from core.text import as_str
from deploy.states import State, TransitionError, check_promote, check_retire

VERSIONS_KEY = "arena:versions"
CURRENT_KEY = "arena:current"
PREVIOUS_KEY = "arena:current:previous"
PREVIOUS_LIMIT = 100  # rollback steps remembered
SEQ_KEY = "arena:versions:seq:{kind}"
BASE = "base"
CURRENT_ALIAS = "current"

Kind = Literal["base", "policy", "reward"]


class UnknownVersion(KeyError):
    def __init__(self, version: str) -> None:
        super().__init__(version)
        self.version = version

    def __str__(self) -> str:
        return f"unknown version {self.version!r}"


@dataclass
class VersionRecord:
    id: str
    kind: Kind
    state: State
    parent: str | None = None
    path: str | None = None  # adapter folder (policies) or model folder (reward models)
    created_at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    promoted_by: str | None = None
    promoted_at: float | None = None
    created_by: str | None = None  # who registered it (the learner's versions: "learner")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionRecord:
        return cls(**json.loads(raw))


def records_in_order(raw_records: list[bytes]) -> list[VersionRecord]:
    """The records of the versions hash (HVALS), oldest first."""
    records = [VersionRecord.from_json(raw) for raw in raw_records]
    return sorted(records, key=lambda r: (r.created_at, r.id))


def answers_chats(record: VersionRecord, include_retired: bool = False) -> bool:
    """The base and the policy adapters answer chats and battles, unless retired."""
    return record.kind in ("base", "policy") and (include_retired or record.state != "retired")


class Registry:
    """The version store on a synchronous Redis client (writes, and reads outside the gateway;
    the gateway reads through serve/versions.py on its async client, with the same helpers)."""

    def __init__(self, client: redis.Redis, audit_path: Path | None = None) -> None:
        self.redis = client
        self.audit_path = audit_path

    # --- reads -----------------------------------------------------------------------------
    def get(self, version: str) -> VersionRecord:
        raw = self.redis.hget(VERSIONS_KEY, version)
        if raw is None:
            raise UnknownVersion(version)
        return VersionRecord.from_json(raw)

    def all(self) -> list[VersionRecord]:
        return records_in_order(self.redis.hvals(VERSIONS_KEY))

    def policies(self, include_retired: bool = False) -> list[VersionRecord]:
        """Versions that can answer a chat: the base and the policy adapters."""
        return [r for r in self.all() if answers_chats(r, include_retired)]

    def current(self) -> str:
        return as_str(self.redis.get(CURRENT_KEY)) or BASE

    def resolve(self, name: str) -> VersionRecord:
        """Map a requested model name (a version id or the alias `current`) to its record."""
        return self.get(self.current() if name == CURRENT_ALIAS else name)

    # --- writes ----------------------------------------------------------------------------
    def ensure_base(self) -> None:
        """A fresh install has one version: the frozen base model, current."""
        record = VersionRecord(id=BASE, kind="base", state="current", created_at=0.0)
        if self.redis.hsetnx(VERSIONS_KEY, BASE, record.to_json()):
            self.redis.setnx(CURRENT_KEY, BASE)
            self.audit("register", BASE, actor="system", before=None, after="current")

    def next_id(self, kind: Literal["policy", "reward"]) -> str:
        prefix = "policy" if kind == "policy" else "rm"
        while True:
            n = int(self.redis.incr(SEQ_KEY.format(kind=kind)))
            candidate = f"{prefix}-v{n}"
            if not self.redis.hexists(VERSIONS_KEY, candidate):
                return candidate

    def add(self, record: VersionRecord, actor: str = "system") -> VersionRecord:
        """Register a new version; its id must be new (names are immutable)."""
        if record.created_by is None:
            record.created_by = actor
        if not self.redis.hsetnx(VERSIONS_KEY, record.id, record.to_json()):
            raise TransitionError(f"version {record.id} already exists; names are immutable")
        self.audit("register", record.id, actor=actor, before=None, after=record.state)
        return record

    def promote(self, version: str, actor: str, reason: str | None = None) -> tuple[str, str]:
        """Make `version` current; the old current becomes a candidate. Returns (old, new)."""

        def change(pipe: redis.client.Pipeline) -> tuple[str, str]:
            record = self._get_in(pipe, version)
            if record.kind == "reward":
                raise TransitionError(f"{version} is a reward model, not a policy")
            check_promote(version, record.state)
            old_id = as_str(pipe.get(CURRENT_KEY)) or BASE
            old = self._get_in(pipe, old_id)
            record.state, record.promoted_by, record.promoted_at = "current", actor, time.time()
            old.state = "candidate"
            pipe.multi()
            pipe.hset(VERSIONS_KEY, mapping={old.id: old.to_json(), record.id: record.to_json()})
            pipe.set(CURRENT_KEY, record.id)
            pipe.lrem(PREVIOUS_KEY, 0, old.id)  # its older place: the newest one counts
            pipe.lpush(PREVIOUS_KEY, old.id)
            pipe.ltrim(PREVIOUS_KEY, 0, PREVIOUS_LIMIT - 1)
            return old.id, record.id

        old, new = self.redis.transaction(
            change, VERSIONS_KEY, CURRENT_KEY, value_from_callable=True
        )
        self.audit("promote", new, actor=actor, before=f"current={old}", after=f"current={new}",
                   reason=reason)
        return old, new

    def rollback_target(self) -> str:
        """The most recent earlier current that is still live."""
        return self._rollback_target_in(self.redis)

    def rollback(self, actor: str, reason: str | None = None, *,
                 expected_current: str | None = None,
                 expected_target: str | None = None) -> tuple[str, str]:
        """Make the most recent live earlier current version current again; the old current
        becomes a candidate. One transaction: the target is read, checked and flipped to
        under WATCH, so a concurrent promote or rollback cannot interleave. With
        `expected_current` / `expected_target` (what the caller saw, and loaded into the
        replicas, before) a change meanwhile raises TransitionError and changes nothing."""

        def change(pipe: redis.client.Pipeline) -> tuple[str, str]:
            old_id = as_str(pipe.get(CURRENT_KEY)) or BASE
            if expected_current is not None and old_id != expected_current:
                raise TransitionError(f"current changed meanwhile ({expected_current} -> "
                                      f"{old_id}); nothing was rolled back")
            target = self._rollback_target_in(pipe)
            if expected_target is not None and target != expected_target:
                raise TransitionError(f"the rollback target changed meanwhile "
                                      f"({expected_target} -> {target}); nothing was rolled back")
            record, old = self._get_in(pipe, target), self._get_in(pipe, old_id)
            check_promote(target, record.state)
            record.state, record.promoted_by, record.promoted_at = "current", actor, time.time()
            old.state = "candidate"
            pipe.multi()
            pipe.hset(VERSIONS_KEY, mapping={old.id: old.to_json(), record.id: record.to_json()})
            pipe.set(CURRENT_KEY, record.id)
            # Neither is an earlier current now: a second rollback goes one further back
            # instead of flip-flopping.
            pipe.lrem(PREVIOUS_KEY, 0, record.id)
            pipe.lrem(PREVIOUS_KEY, 0, old.id)
            return old.id, record.id

        old, new = self.redis.transaction(
            change, VERSIONS_KEY, CURRENT_KEY, PREVIOUS_KEY, value_from_callable=True
        )
        self.audit("promote", new, actor=actor, before=f"current={old}", after=f"current={new}",
                   reason=reason)
        self.audit("rollback", new, actor=actor, before=f"current={old}", after=f"current={new}",
                   reason=reason)
        return old, new

    def retire(self, version: str, actor: str,
               reason: str | None = None) -> tuple[State, State]:
        def change(pipe: redis.client.Pipeline) -> tuple[State, State]:
            record = self._get_in(pipe, version)
            before = record.state
            check_retire(version, record.state)
            record.state = "retired"
            pipe.multi()
            pipe.hset(VERSIONS_KEY, version, record.to_json())
            pipe.lrem(PREVIOUS_KEY, 0, version)  # a retired version is no rollback target
            return before, record.state

        before, after = self.redis.transaction(change, VERSIONS_KEY, value_from_callable=True)
        self.audit("retire", version, actor=actor, before=before, after=after, reason=reason)
        return before, after

    # --- helpers ---------------------------------------------------------------------------
    @classmethod
    def _rollback_target_in(cls, pipe: redis.Redis | redis.client.Pipeline) -> str:
        for raw in pipe.lrange(PREVIOUS_KEY, 0, -1):
            candidate = as_str(raw)
            try:
                if cls._get_in(pipe, candidate).state == "candidate":
                    return candidate
            except UnknownVersion:
                continue
        raise TransitionError("nothing to roll back to: no earlier current version is live")

    @staticmethod
    def _get_in(pipe: redis.Redis | redis.client.Pipeline, version: str) -> VersionRecord:
        raw = pipe.hget(VERSIONS_KEY, version)
        if raw is None:
            raise UnknownVersion(version)
        return VersionRecord.from_json(raw)

    def audit(self, action: str, version: str | None, actor: str, before: Any, after: Any,
              reason: str | None = None) -> None:
        """Append one line to the audit log (also for operator actions outside the registry,
        e.g. pausing the learner)."""
        if self.audit_path is None:
            return
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"ts": time.time(), "action": action, "version": version, "actor": actor,
                 "before": before, "after": after}
        if reason is not None:
            entry["reason"] = reason
        line = json.dumps(entry)
        with self.audit_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
