"""One member of a Redis Streams consumer group: read, process, acknowledge; reclaim what a
dead member left behind; move what can never be processed to the dead-letter stream.

The guarantees, for every entry of the stream:

- XACK only after `process` returned, so a crash anywhere before leaves the entry pending in
  the group; a live member re-claims it (XAUTOCLAIM) once it has been idle
  `claim_idle_ms`. `process` must therefore be idempotent (insert-or-ignore, applied-sets).
- An entry whose `parse` raises `MalformedEntry` / `MalformedVote` can never succeed: it is
  dead-lettered at once. An entry whose processing fails is retried on later deliveries and
  dead-lettered when its delivery count (XPENDING) reaches `max_deliveries`; so is one that
  was delivered more than `max_deliveries` times without an answer (it kept killing its
  consumer). A failing entry never blocks the others: a failed batch is retried one entry at
  a time.
- Dead-lettering is one MULTI: XADD to the dead-letter stream (original id, fields, reason)
  and XACK. Nothing is dropped silently; the dead-letter stream keeps the newest
  `dead_letter_maxlen` (`arena dead-letters list|replay`, feedback/dead_letters.py).
- A transient error (Redis or the database unreachable) is not the entry's fault: the batch
  stays pending, its delivery count is given back (XCLAIM RETRYCOUNT), and the error goes up
  to the caller's loop, which backs off.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import redis

from core.text import as_str
from feedback.vote_record import MalformedVote
from feedback.vote_stream import DEAD_LETTER_STREAM

log = logging.getLogger("arena.feedback")
T = TypeVar("T")


class MalformedEntry(ValueError):
    """A stream entry that can never be processed (it goes to the dead-letter stream)."""


PERMANENT_ERRORS: tuple[type[Exception], ...] = (MalformedEntry, MalformedVote)
REDIS_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError,
)


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: dict[str, str]
    deliveries: int  # how many times the group has delivered it, this time included


@dataclass(frozen=True)
class ConsumerConfig:
    batch_size: int = 100
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    dead_letter_stream: str = DEAD_LETTER_STREAM
    dead_letter_maxlen: int = 10_000


def _decode_fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {as_str(key): as_str(value) for key, value in raw.items()}


class StreamConsumer(ABC, Generic[T]):
    """Subclasses say how to `parse` one entry and how to `process` a batch of parsed items."""

    #: Errors that say "the world is down, not this entry" (subclasses add their database's).
    transient_errors: ClassVar[tuple[type[Exception], ...]] = REDIS_TRANSIENT_ERRORS

    def __init__(
        self, client: redis.Redis, stream: str, group: str, name: str, config: ConsumerConfig
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.name = name
        self.config = config
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0

    # --- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def parse(self, entry: Entry) -> T:
        """Turn an entry into an item; raise MalformedEntry if it can never be processed."""

    @abstractmethod
    def process(self, entry_ids: Sequence[str], items: Sequence[T]) -> None:
        """Do the work for a batch, idempotently; raise to leave the whole batch pending."""

    # --- the loop body -----------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; a new group reads from the start."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def run_once(self) -> int:
        """Handle one batch: stale entries re-claimed from dead members when a claim is due,
        otherwise new entries (waiting up to block_ms). Returns how many entries it handled."""
        entries = self._claim_stale() if time.monotonic() >= self._next_claim_at else []
        if not entries:
            entries = self._read_new()
        if entries:
            self.handle(entries)
        return len(entries)

    def handle(self, entries: Sequence[Entry]) -> None:
        parsed: list[tuple[Entry, T]] = []
        for entry in entries:
            if entry.deliveries > self.config.max_deliveries:
                self.dead_letter(entry, f"delivered {entry.deliveries} times without success")
                continue
            try:
                parsed.append((entry, self.parse(entry)))
            except PERMANENT_ERRORS as error:
                self.dead_letter(entry, f"malformed: {error}")
            except self.transient_errors:
                raise
            except Exception as error:  # noqa: BLE001 - a bug on one entry must not stop all
                self._failed(entry, error)
        if not parsed:
            return
        try:
            self._process_and_ack(parsed)
        except self.transient_errors:
            self._give_back_delivery([entry for entry, _ in parsed])
            raise
        except Exception as error:  # noqa: BLE001
            if len(parsed) == 1:
                self._failed(parsed[0][0], error)
                return
            log.warning("%s: batch of %d failed (%s); retrying one by one",
                        self.group, len(parsed), error)
            for one in parsed:
                try:
                    self._process_and_ack([one])
                except self.transient_errors:
                    self._give_back_delivery([one[0]])
                    raise
                except Exception as one_error:  # noqa: BLE001
                    self._failed(one[0], one_error)

    # --- reading -----------------------------------------------------------------------
    def _read_new(self) -> list[Entry]:
        try:
            reply = self.client.xreadgroup(
                self.group, self.name, {self.stream: ">"},
                count=self.config.batch_size, block=self.config.block_ms,
            )
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure_group()  # the stream or group vanished (e.g. Redis lost its data)
            return []
        if not reply:
            return []
        _stream, messages = reply[0]
        return [Entry(as_str(entry_id), _decode_fields(fields), 1)
                for entry_id, fields in messages if fields is not None]

    def _claim_stale(self) -> list[Entry]:
        """XAUTOCLAIM one page of entries idle >= claim_idle_ms (from any member, this one
        included: that is how a failed entry is retried), with their delivery counts."""
        try:
            next_cursor, claimed, *_deleted = self.client.xautoclaim(
                self.stream, self.group, self.name, self.config.claim_idle_ms,
                start_id=self._claim_cursor, count=self.config.batch_size,
            )
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure_group()
            return []
        self._claim_cursor = as_str(next_cursor)
        if self._claim_cursor == "0-0":  # a full pass over the pending list is done
            self._next_claim_at = time.monotonic() + self.config.claim_idle_ms / 2000
        live = [(as_str(entry_id), fields) for entry_id, fields in claimed if fields is not None]
        if not live:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for entry_id, _fields in live:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id,
                                    count=1, consumername=self.name)
            pending = pipe.execute()
        entries = []
        for (entry_id, fields), info in zip(live, pending, strict=True):
            deliveries = int(info[0]["times_delivered"]) if info else 1
            entries.append(Entry(entry_id, _decode_fields(fields), deliveries))
        log.info("%s/%s re-claimed %d stale entries", self.group, self.name, len(entries))
        return entries

    # --- outcomes ----------------------------------------------------------------------
    def _process_and_ack(self, parsed: Sequence[tuple[Entry, T]]) -> None:
        self.process([entry.entry_id for entry, _ in parsed], [item for _, item in parsed])
        self.client.xack(self.stream, self.group, *[entry.entry_id for entry, _ in parsed])

    def _failed(self, entry: Entry, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if entry.deliveries >= self.config.max_deliveries:
            self.dead_letter(entry, f"failed {entry.deliveries} times, last: {reason}")
        else:
            log.warning("%s: entry %s failed (delivery %d of %d): %s", self.group,
                        entry.entry_id, entry.deliveries, self.config.max_deliveries, reason)

    def _give_back_delivery(self, entries: Sequence[Entry]) -> None:
        """Undo this delivery's count (XCLAIM RETRYCOUNT) for entries that failed because a
        server was down: an outage must not push good entries towards the dead letters."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.xclaim(self.stream, self.group, self.name, 0, [entry.entry_id],
                                retrycount=max(entry.deliveries - 1, 0), justid=True)
                pipe.execute()
        except self.transient_errors:
            pass  # Redis itself is down: nothing can be counted now either

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """Move the entry to the dead-letter stream with its reason, and acknowledge it."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.config.dead_letter_stream, {
                "original_id": entry.entry_id, "stream": self.stream, "group": self.group,
                "consumer": self.name, "reason": reason, "deliveries": entry.deliveries,
                "dead_at": time.time(), "fields": json.dumps(entry.fields, ensure_ascii=False),
            }, maxlen=self.config.dead_letter_maxlen, approximate=True)
            pipe.xack(self.stream, self.group, entry.entry_id)
            pipe.execute()
        log.error("%s: entry %s dead-lettered to %s: %s", self.group, entry.entry_id,
                  self.config.dead_letter_stream, reason)


# --- stream maintenance --------------------------------------------------------------------
IDLE_CONSUMER_MS = 3_600_000


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def trim_acknowledged(
    client: redis.Redis, stream: str, required_groups: Sequence[str] = ()
) -> int:
    """XTRIM the entries that every group of the stream has been delivered and acknowledged;
    nothing while one of `required_groups` does not exist yet. Returns entries removed."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0  # no such stream
    if not groups or not set(required_groups) <= {as_str(group["name"]) for group in groups}:
        return 0
    keep_from: str | None = None
    for group in groups:
        oldest = client.xpending(stream, group["name"])["min"] if group["pending"] else None
        # None also when the pending entries were acknowledged since XINFO GROUPS.
        needed = as_str(oldest if oldest is not None else group["last-delivered-id"])
        if keep_from is None or _id_key(needed) < _id_key(keep_from):
            keep_from = needed
    if keep_from is None or _id_key(keep_from) == (0, 0):
        return 0
    return int(client.xtrim(stream, minid=keep_from, approximate=True))


def prune_idle_consumers(client: redis.Redis, stream: str, idle_ms: int = IDLE_CONSUMER_MS) -> int:
    """Forget group members idle for `idle_ms` that hold nothing (each process has its own
    name, so every restart leaves one behind). Returns how many were removed."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0
    removed = 0
    for group in groups:
        for member in client.xinfo_consumers(stream, group["name"]):
            if not member["pending"] and int(member["idle"]) >= idle_ms:
                removed += client.xgroup_delconsumer(stream, group["name"], member["name"])
    return removed
