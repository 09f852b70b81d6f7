"""The preference archive: every vote once, and the chat turns that feed the prompt pool.

SQLAlchemy Core on SQLite (the default, a file in the data dir) or PostgreSQL. Every write is
insert-or-ignore on its idempotency key (the vote id = battle id; the chat turn id), so an
entry that the stream delivers twice, e.g. after a crash between the commit and the XACK, is
stored once. Timestamps are Unix seconds (UTC, float): the same on both databases, exact, and
what the vote record carries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Double,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from elo.style_control import STYLE_FEATURES, style_features
from feedback.vote_record import Message, VoteRecord

SQLITE_BUSY_TIMEOUT_S = 30.0
ITER_BATCH = 1000

metadata = MetaData()
JSONColumn = JSON().with_variant(postgresql.JSONB(), "postgresql")

votes = Table(
    "votes",
    metadata,
    Column("vote_id", String, primary_key=True),  # the battle id: one vote per battle
    Column("model_a", String, nullable=False),
    Column("model_b", String, nullable=False),
    Column("winner", String(16), nullable=False),
    Column("conversation_a", JSONColumn, nullable=False),
    Column("conversation_b", JSONColumn, nullable=False),
    Column("answer_a", Text, nullable=False),
    Column("answer_b", Text, nullable=False),
    Column("session", String, nullable=False),
    Column("battle_created_at", Double, nullable=False),
    Column("voted_at", Double, nullable=False, index=True),
    Column("archived_at", Double, nullable=False),
    Column("stream_entry_id", String),
    # Why the vote does not count (comma-separated VoteRecord.flags; "" = it counts). Added
    # after the first release: `Archive.create_tables` adds it to an older table.
    Column("flags", String, nullable=False, server_default=""),
    # The keyed hash of the client address (VoteRecord.voter_address; "" = none known).
    Column("voter_address", String, nullable=False, server_default=""),
    # Each answer's style (elo/style_control.py), for the style-controlled ratings; filled
    # from the answers for rows archived before these columns existed.
    *(Column(name, Integer) for name in (f"{feature}_{side}" for side in "ab"
                                         for feature in STYLE_FEATURES)),
)
STYLE_COLUMNS = [f"{feature}_{side}" for side in "ab" for feature in STYLE_FEATURES]
BACKFILL_BATCH = 1000

chat_turns = Table(
    "chat_turns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("turn_id", String, nullable=False, unique=True),  # the chat stream's entry id
    Column("session", String, nullable=False),
    Column("model", String, nullable=False),
    Column("messages", JSONColumn, nullable=False),
    Column("created_at", Double, nullable=False, index=True),
)


# Each scored voter's anomaly score (feedback/voter_scores.py): a session, or an address
# (`address:<hash>`, matching votes.voter_address). Its votes stay in `votes`; what a flag
# changes is which of them the ratings and the reward model count.
voters = Table(
    "voters",
    metadata,
    Column("session", String, primary_key=True),  # the voter: a session id or an address
    Column("score", Double, nullable=False),
    Column("flagged", Boolean, nullable=False),
    Column("votes", Integer, nullable=False),
    Column("updated_at", Double, nullable=False),
)
FlaggedVotes = Literal["exclude", "downweight", "keep"]


def _by_flagged_voter() -> Any:
    """True for a vote whose session or address is flagged."""
    flagged = select(voters.c.session).where(voters.c.flagged.is_(True))
    return votes.c.session.in_(flagged) | votes.c.voter_address.in_(flagged)


@dataclass(frozen=True)
class StoredVote:
    """A vote as archived: the record plus when and from which stream entry it was stored."""

    record: VoteRecord
    archived_at: float
    stream_entry_id: str | None


@dataclass(frozen=True)
class ChatTurn:
    turn_id: str  # idempotency key (the chat stream entry id)
    session: str
    model: str
    messages: list[Message]
    created_at: float


class PairCount(NamedTuple):
    model_a: str
    model_b: str
    winner: str
    n: int


TimeBound = datetime | float | None


def _epoch(bound: TimeBound) -> float | None:
    """A datetime (naive = UTC) or Unix seconds, as Unix seconds."""
    if bound is None or isinstance(bound, float | int):
        return bound
    if bound.tzinfo is None:
        return (bound - datetime(1970, 1, 1)).total_seconds()
    return bound.timestamp()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL: readers (export, the ranker's refit) never block the archiver; FULL: a commit
        # is on disk before the archiver acknowledges the stream entries it holds.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    return engine


def _style_values(answer_a: Any, answer_b: Any) -> dict[str, int]:
    """The style columns of one vote (an answer that is not text has no style: zeros)."""
    values = [*(style_features(answer_a) if isinstance(answer_a, str) else (0,) * 4),
              *(style_features(answer_b) if isinstance(answer_b, str) else (0,) * 4)]
    return dict(zip(STYLE_COLUMNS, values, strict=True))


class Archive:
    """The archive database behind one SQLAlchemy URL (SQLite or PostgreSQL)."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"archive supports SQLite and PostgreSQL, not {self.dialect}")
        if create:
            self.create_tables()

    def create_tables(self) -> None:
        try:
            metadata.create_all(self.engine)
        except (IntegrityError, OperationalError, ProgrammingError):
            # Two processes starting at once can both see "no table" and race to create it:
            # the loser's second look finds the tables.
            time.sleep(0.2)
            metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Migrate an archive made by an older release: add the columns it lacks (their
        server defaults fill the existing rows)."""
        present = {c["name"] for c in inspect(self.engine).get_columns(votes.name)}
        for column in votes.columns:
            if column.name in present:
                continue
            kind = column.type.compile(self.engine.dialect)
            default = column.server_default.arg if column.server_default is not None else None
            clause = f" NOT NULL DEFAULT '{default}'" if default is not None else ""
            try:
                with self.engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {votes.name} ADD COLUMN "{column.name}" '
                                      f"{kind}{clause}"))
            except (OperationalError, ProgrammingError):  # another process added it first
                if column.name not in {c["name"] for c in
                                       inspect(self.engine).get_columns(votes.name)}:
                    raise
        self._backfill_style()

    def _backfill_style(self) -> None:
        """Style features of rows archived before the style columns existed."""
        missing = select(votes.c.vote_id, votes.c.answer_a, votes.c.answer_b).where(
            votes.c[STYLE_COLUMNS[0]].is_(None)).limit(BACKFILL_BATCH)
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(missing).all()
                for vote_id, answer_a, answer_b in rows:
                    conn.execute(votes.update().where(votes.c.vote_id == vote_id).values(
                        _style_values(answer_a, answer_b)))
            if len(rows) < BACKFILL_BATCH:
                return

    def close(self) -> None:
        self.engine.dispose()

    def _insert_or_ignore(self, table: Table, key: str) -> Any:
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])

    # --- writes ------------------------------------------------------------------------
    def insert_votes(
        self, records: Sequence[VoteRecord], entry_ids: Sequence[str | None] | None = None
    ) -> int:
        """Store the votes not already archived, in one transaction; returns how many were new.

        `entry_ids[i]` is the stream entry that carried `records[i]` (kept for tracing).
        """
        if entry_ids is not None and len(entry_ids) != len(records):
            raise ValueError("entry_ids must match records one to one")
        now = time.time()
        rows: dict[str, dict[str, Any]] = {}
        for i, record in enumerate(records):
            rows.setdefault(record.vote_id, {
                "vote_id": record.vote_id, "model_a": record.model_a,
                "model_b": record.model_b, "winner": record.winner,
                "conversation_a": record.conversation_a, "conversation_b": record.conversation_b,
                "answer_a": record.answer_a, "answer_b": record.answer_b,
                "session": record.session, "battle_created_at": record.battle_created_at,
                "voted_at": record.voted_at, "archived_at": now,
                "stream_entry_id": entry_ids[i] if entry_ids is not None else None,
                "flags": ",".join(record.flags), "voter_address": record.voter_address,
                **_style_values(record.answer_a, record.answer_b),
            })
        if not rows:
            return 0
        statement = self._insert_or_ignore(votes, "vote_id").returning(votes.c.vote_id)
        with self.engine.begin() as conn:
            return len(conn.execute(statement, list(rows.values())).all())

    def insert_chat_turns(self, turns: Sequence[ChatTurn]) -> int:
        """Store the chat turns not already archived; returns how many were new."""
        rows = {turn.turn_id: {
            "turn_id": turn.turn_id, "session": turn.session, "model": turn.model,
            "messages": turn.messages, "created_at": turn.created_at,
        } for turn in turns}
        if not rows:
            return 0
        statement = self._insert_or_ignore(chat_turns, "turn_id").returning(chat_turns.c.turn_id)
        with self.engine.begin() as conn:
            return len(conn.execute(statement, list(rows.values())).all())

    def upsert_voters(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update voters' scores (keys: session = the voter, score, flagged, votes,
        updated_at)."""
        if not rows:
            return
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        statement = dialect.insert(voters)
        statement = statement.on_conflict_do_update(
            index_elements=[voters.c.session],
            set_={name: statement.excluded[name] for name in
                  ("score", "flagged", "votes", "updated_at")})
        with self.engine.begin() as conn:
            conn.execute(statement, list(rows))

    def flagged_voters(self) -> dict[str, float]:
        """Flagged voters (sessions and addresses) and their scores."""
        with self.engine.connect() as conn:
            return {session: score for session, score in conn.execute(
                select(voters.c.session, voters.c.score).where(voters.c.flagged.is_(True)))}

    def voter_scores(self) -> dict[str, float]:
        """Every scored voter and its score."""
        with self.engine.connect() as conn:
            return {session: score for session, score in conn.execute(
                select(voters.c.session, voters.c.score))}

    # --- reads -------------------------------------------------------------------------
    def count(self) -> int:
        """Archived votes."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(votes)).scalar_one())

    def count_chat_turns(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(chat_turns)).scalar_one())

    def iter_votes(self, since: TimeBound = None, until: TimeBound = None,
                   without_flagged_voters: bool = False) -> Iterator[StoredVote]:
        """Votes with since <= voted_at < until, oldest first, streamed in batches (without
        those of flagged voters if asked)."""
        query = select(votes).order_by(votes.c.voted_at, votes.c.vote_id)
        if without_flagged_voters:
            query = query.where(~_by_flagged_voter())
        if (start := _epoch(since)) is not None:
            query = query.where(votes.c.voted_at >= start)
        if (end := _epoch(until)) is not None:
            query = query.where(votes.c.voted_at < end)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=ITER_BATCH).execute(query)
            for row in result.mappings():
                record = VoteRecord(
                    battle_id=row["vote_id"], model_a=row["model_a"], model_b=row["model_b"],
                    winner=row["winner"], conversation_a=row["conversation_a"],
                    conversation_b=row["conversation_b"], answer_a=row["answer_a"],
                    answer_b=row["answer_b"], session=row["session"],
                    battle_created_at=row["battle_created_at"], voted_at=row["voted_at"],
                    flags=[f for f in (row["flags"] or "").split(",") if f],
                    voter_address=row["voter_address"] or "",
                )
                yield StoredVote(record, row["archived_at"], row["stream_entry_id"])

    def count_between(self, since: TimeBound = None, until: TimeBound = None) -> int:
        """How many votes `iter_votes(since, until)` yields (for a progress bar)."""
        query = select(func.count()).select_from(votes)
        if (start := _epoch(since)) is not None:
            query = query.where(votes.c.voted_at >= start)
        if (end := _epoch(until)) is not None:
            query = query.where(votes.c.voted_at < end)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def pair_counts(self, flagged_voters: bool | None = None) -> list[PairCount]:
        """Votes that count (no flag) per (model_a, model_b, winner): all the Bradley-Terry
        refit needs. `flagged_voters`: None counts every vote, False leaves out the votes of
        flagged voters (session or address), True counts only theirs."""
        query = (
            select(votes.c.model_a, votes.c.model_b, votes.c.winner, func.count())
            .where(votes.c.flags == "")
            .group_by(votes.c.model_a, votes.c.model_b, votes.c.winner)
            .order_by(votes.c.model_a, votes.c.model_b, votes.c.winner)
        )
        if flagged_voters is not None:
            query = query.where(_by_flagged_voter() if flagged_voters else ~_by_flagged_voter())
        with self.engine.connect() as conn:
            return [PairCount(a, b, winner, int(n)) for a, b, winner, n in conn.execute(query)]

    def session_data(self, session: str, limit: int) -> dict[str, Any]:
        """One session's archived chat turns and votes (the newest `limit` of each), and how
        many there are: what `GET /v1/session/data` shows its owner."""
        turns_q = (select(chat_turns.c.turn_id, chat_turns.c.model, chat_turns.c.messages,
                          chat_turns.c.created_at)
                   .where(chat_turns.c.session == session)
                   .order_by(chat_turns.c.created_at.desc()).limit(limit))
        votes_q = (select(votes.c.vote_id, votes.c.model_a, votes.c.model_b, votes.c.winner,
                          votes.c.conversation_a, votes.c.answer_a, votes.c.answer_b,
                          votes.c.voted_at)
                   .where(votes.c.session == session)
                   .order_by(votes.c.voted_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            n_turns = conn.execute(select(func.count()).select_from(chat_turns)
                                   .where(chat_turns.c.session == session)).scalar_one()
            n_votes = conn.execute(select(func.count()).select_from(votes)
                                   .where(votes.c.session == session)).scalar_one()
            return {"chat_turns": [dict(row) for row in conn.execute(turns_q).mappings()],
                    "votes": [dict(row) for row in conn.execute(votes_q).mappings()],
                    "n_chat_turns": int(n_turns), "n_votes": int(n_votes)}

    def delete_session(self, session: str, until: float) -> tuple[int, int]:
        """Delete one session's chat turns and votes made before `until`; returns how many
        (chat turns, votes). One transaction."""
        with self.engine.begin() as conn:
            turns = conn.execute(chat_turns.delete().where(
                chat_turns.c.session == session, chat_turns.c.created_at <= until)).rowcount
            voted = conn.execute(votes.delete().where(
                votes.c.session == session, votes.c.voted_at <= until)).rowcount
        return int(turns), int(voted)

    def style_rows(self, without_flagged_voters: bool = False
                   ) -> tuple[list[tuple[str, str, str]], list[list[int]]]:
        """Votes that count, one row each: (model_a, model_b, winner) and the style columns
        (STYLE_COLUMNS order), for the style-controlled fit."""
        query = (select(votes.c.model_a, votes.c.model_b, votes.c.winner,
                        *(votes.c[name] for name in STYLE_COLUMNS))
                 .where(votes.c.flags == ""))
        if without_flagged_voters:
            query = query.where(~_by_flagged_voter())
        keys, styles = [], []
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=ITER_BATCH).execute(query):
                keys.append((row[0], row[1], row[2]))
                styles.append([value or 0 for value in row[3:]])
        return keys, styles

    def recent_prompts(self, limit: int) -> list[list[Message]]:
        """The newest distinct prompts (message lists), newest first: from archived chat
        turns and from the conversations of voted battles."""
        if limit <= 0:
            return []
        chats = (select(chat_turns.c.messages, chat_turns.c.created_at.label("at"))
                 .order_by(chat_turns.c.created_at.desc()).limit(limit))
        voted = (select(votes.c.conversation_a, votes.c.voted_at.label("at"))
                 .order_by(votes.c.voted_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            candidates = list(conn.execute(chats)) + list(conn.execute(voted))
        candidates.sort(key=lambda row: row[1], reverse=True)
        prompts: list[list[Message]] = []
        seen: set[str] = set()
        for messages, _at in candidates:
            key = repr(messages)
            if messages and key not in seen:
                seen.add(key)
                prompts.append(messages)
                if len(prompts) == limit:
                    break
        return prompts
