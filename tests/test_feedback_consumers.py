"""The consumer groups against a real Redis (AOF) and real databases: exactly-once archiving,
redelivery, dead letters, a Redis restart between XADD and XACK, the ranker and the learner
trigger, the stream figures, and the whole set running in one process."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis
from sqlalchemy.exc import OperationalError

from arena.consumers import run_consumers
from core.settings import Settings
from deploy.decision import LEARNER_ACTOR
from deploy.registry import Registry, VersionRecord
from elo.online_elo import replay
from elo.ratings_store import APPLIED_KEY, load_fit, load_history, load_online
from feedback.archive import Archive
from feedback.consumers import ARCHIVER, Archiver, Ranker, consumer_config
from feedback.refit import refit_ratings
from feedback.stats import stream_figures, stream_stats
from feedback.stream_consumer import StreamConsumer, trim_acknowledged
from feedback.vote_record import VoteRecord
from feedback.vote_stream import (
    CHATS_STREAM,
    DEAD_LETTER_STREAM,
    RECORD_FIELD,
    VOTES_STREAM,
    publish_vote_sync,
)
from learner.trigger import LAST_TRIGGER_KEY, IterationLock, set_paused
from learner.vote_trigger import LearnerTrigger, votes_since_learner_run
from testkit.synthetic_votes import synthetic_votes


def make_settings(tmp_path: Path, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        data_dir=tmp_path / "var", redis_url=redis_url, stream_claim_idle_ms=50,
        stream_batch_size=64, stream_block_ms=50, stream_max_deliveries=3,
        bt_bootstrap_rounds=20, refit_every_s=0.2, learn_every_votes=50,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def publish(client: redis.Redis, records: Sequence[VoteRecord]) -> None:
    """XADD the votes as the gateway does, pipelined (one fsync for many with AOF always)."""
    with client.pipeline(transaction=False) as pipe:
        for record in records:
            publish_vote_sync(pipe, record)
        pipe.execute()


def drain(*consumers: StreamConsumer, timeout_s: float = 20.0) -> None:
    """Run the consumers until their groups have nothing new and nothing pending."""
    for consumer in consumers:
        consumer.ensure_group()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handled = sum(consumer.run_once() for consumer in consumers)
        pending = sum(consumer.client.xpending(consumer.stream, consumer.group)["pending"]
                      for consumer in consumers)
        if not handled and not pending:
            return
    raise AssertionError("consumers did not drain in time")


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Archive:
    url = (f"sqlite:///{tmp_path / 'archive.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    archive = Archive(url)
    yield archive
    archive.close()


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Archive:
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    yield archive
    archive.close()


def archived_ids(archive: Archive) -> list[str]:
    return [stored.record.vote_id for stored in archive.iter_votes()]


def test_votes_archived_exactly_once(client: redis.Redis, archive: Archive, tmp_path: Path,
                                     redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    votes = synthetic_votes(500, seed=4)
    publish(client, votes + votes[:20])  # the gateway never does this, but if it did: once
    two = [Archiver(client, archive, consumer_config(settings)) for _ in range(2)]
    drain(*two)
    ids = archived_ids(archive)
    assert len(ids) == len(set(ids)) == 500
    assert set(ids) == {vote.vote_id for vote in votes}
    assert client.xlen(DEAD_LETTER_STREAM) == 0


def test_redelivered_entry_counts_once(client: redis.Redis, sqlite_archive: Archive,
                                       tmp_path: Path, redis_url: str) -> None:
    """A consumer does its work and dies before XACK: the entries are re-claimed and done
    again by a live one, and still count once in the archive and in the online ratings."""
    settings = make_settings(tmp_path, redis_url, stream_batch_size=200)
    config = consumer_config(settings)
    votes = synthetic_votes(120, seed=5)
    publish(client, votes)
    dead = [Archiver(client, sqlite_archive, config, name="dead-archiver"),
            Ranker(client, settings.elo_k, config, name="dead-ranker")]
    for consumer in dead:
        consumer.ensure_group()
        entries = consumer._read_new()  # delivered ...
        consumer.process([e.entry_id for e in entries],  # ... processed, never acknowledged
                         [consumer.parse(e) for e in entries])
    assert client.xpending(VOTES_STREAM, ARCHIVER)["pending"] == 120
    time.sleep(0.1)  # past claim_idle_ms
    drain(Archiver(client, sqlite_archive, config), Ranker(client, settings.elo_k, config))
    assert sorted(archived_ids(sqlite_archive)) == sorted(v.vote_id for v in votes)
    expected = replay([(v.model_a, v.model_b, v.winner) for v in votes], k=settings.elo_k)
    assert load_online(client) == pytest.approx(expected)
    assert client.zcard(APPLIED_KEY) == 120


def test_malformed_entries_dead_lettered(client: redis.Redis, sqlite_archive: Archive,
                                         tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    votes = synthetic_votes(30, seed=6)
    publish(client, votes[:10])
    bad = {
        client.xadd(VOTES_STREAM, {RECORD_FIELD: "{not json"}).decode(): "not a vote record",
        client.xadd(VOTES_STREAM, {"something": "else"}).decode(): "no 'record' field",
        client.xadd(VOTES_STREAM, {RECORD_FIELD: votes[10].to_json().replace(
            '"winner":"', '"winner":"x')}).decode(): "winner",
    }
    publish(client, votes[11:])
    drain(Archiver(client, sqlite_archive, consumer_config(settings)))
    assert sorted(archived_ids(sqlite_archive)) == sorted(
        v.vote_id for v in votes[:10] + votes[11:])
    dead = client.xrange(DEAD_LETTER_STREAM)
    assert len(dead) == 3
    for _dead_id, fields in dead:
        original = fields[b"original_id"].decode()
        assert bad[original] in fields[b"reason"].decode()
        assert fields[b"group"] == ARCHIVER.encode()
        assert json.loads(fields[b"fields"])  # the original entry, kept for a replay
    assert client.xpending(VOTES_STREAM, ARCHIVER)["pending"] == 0


class FlakyArchiver(Archiver):
    """Fails for chosen vote ids: `poison` always (a bug), `outage` with a transient error."""

    def __init__(self, *args: object, poison: str = "", outage: int = 0) -> None:
        super().__init__(*args)
        self.poison = poison
        self.outage = outage

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        if self.outage:
            self.outage -= 1
            raise OperationalError("INSERT", {}, Exception("database is down"))
        if any(item.vote_id == self.poison for item in items):
            raise RuntimeError("cannot store this one")
        super().process(entry_ids, items)


def test_failing_entry_retried_then_dead_lettered(client: redis.Redis, sqlite_archive: Archive,
                                                  tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, stream_max_deliveries=3)
    votes = synthetic_votes(40, seed=7)
    publish(client, votes)
    consumer = FlakyArchiver(client, sqlite_archive, consumer_config(settings),
                             poison=votes[17].vote_id)
    consumer.ensure_group()
    deadline = time.monotonic() + 10
    while client.xlen(DEAD_LETTER_STREAM) == 0 and time.monotonic() < deadline:
        consumer.run_once()
    assert sqlite_archive.count() == 39  # the others were not held up
    ((_id, fields),) = client.xrange(DEAD_LETTER_STREAM)
    assert fields[b"deliveries"] == b"3"
    assert b"RuntimeError: cannot store this one" in fields[b"reason"]
    assert json.loads(fields[b"fields"])["battle_id"] == votes[17].vote_id
    assert client.xpending(VOTES_STREAM, ARCHIVER)["pending"] == 0


def test_outage_does_not_use_up_deliveries(client: redis.Redis, sqlite_archive: Archive,
                                           tmp_path: Path, redis_url: str) -> None:
    """The database down for many deliveries: nothing is dead-lettered, all stored after."""
    settings = make_settings(tmp_path, redis_url, stream_max_deliveries=2)
    votes = synthetic_votes(20, seed=8)
    publish(client, votes)
    consumer = FlakyArchiver(client, sqlite_archive, consumer_config(settings), outage=6)
    consumer.ensure_group()
    for _ in range(6):
        with pytest.raises(OperationalError):
            consumer.run_once()
        time.sleep(0.06)
    drain(consumer)
    assert sqlite_archive.count() == 20
    assert client.xlen(DEAD_LETTER_STREAM) == 0


class KillingArchiver(Archiver):
    """Runs `fault` once, after the batch is stored and before it is acknowledged."""

    def __init__(self, *args: object, fault: object) -> None:
        super().__init__(*args)
        self.fault = fault

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        super().process(entry_ids, items)
        if self.fault is not None:
            fault, self.fault = self.fault, None
            fault()


def test_redis_restart_between_xadd_and_xack(own_redis, sqlite_archive: Archive,
                                             tmp_path: Path) -> None:
    settings = make_settings(tmp_path, own_redis.url)
    client = own_redis.client()
    votes = synthetic_votes(400, seed=9)
    publish(client, votes[:100])
    own_redis.restart()  # SIGKILL: only the AOF (appendfsync always) keeps the votes
    assert client.xlen(VOTES_STREAM) == 100
    publish(client, votes[100:200])

    # Redis killed after the archive commit, still down at the XACK.
    consumer = KillingArchiver(client, sqlite_archive, consumer_config(settings),
                               fault=lambda: own_redis.stop(signal.SIGKILL))
    consumer.ensure_group()
    with pytest.raises(redis.ConnectionError):
        consumer.run_once()
    own_redis.start()
    assert sqlite_archive.count() == 64
    assert client.xpending(VOTES_STREAM, ARCHIVER)["pending"] == 64  # in the AOF
    publish(client, votes[200:300])

    # Redis killed and back at once: redis-py's retry delivers the XACK to the new server.
    consumer.fault = own_redis.restart
    consumer.run_once()
    publish(client, votes[300:])
    time.sleep(0.1)  # the first 64 are now idle long enough to be re-claimed
    drain(consumer)
    assert sorted(archived_ids(sqlite_archive)) == sorted(v.vote_id for v in votes)
    assert client.xlen(DEAD_LETTER_STREAM) == 0


def test_ranker_online_and_refit(client: redis.Redis, sqlite_archive: Archive, tmp_path: Path,
                                 redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    config = consumer_config(settings)
    votes = synthetic_votes(400, seed=10) + synthetic_votes(30, seed=11, self_pairs=True)
    publish(client, votes)
    drain(Archiver(client, sqlite_archive, config), Ranker(client, settings.elo_k, config))
    online = load_online(client)
    assert set(online) == {"base", "policy-v1", "policy-v2"}
    assert online == pytest.approx(
        replay([(v.model_a, v.model_b, v.winner) for v in votes], k=settings.elo_k))
    fit = refit_ratings(client, sqlite_archive, rounds=settings.bt_bootstrap_rounds)
    assert fit is not None and fit.n_votes == 400  # self-pairs carry no order
    assert fit.anchor == "base" and fit.ratings["base"] == pytest.approx(1000.0)
    assert fit.ratings["policy-v2"] > fit.ratings["base"]
    for model in fit.ratings:
        assert fit.lower[model] <= fit.ratings[model] <= fit.upper[model]
    assert 0.0 < fit.win_rate_vs_base["policy-v2"] < 1.0 and fit.win_rate_vs_base["base"] is None
    assert load_fit(client) == fit
    assert refit_ratings(client, sqlite_archive, rounds=20) is None  # nothing new
    assert len(load_history(client)) == 1


def test_learner_trigger(client: redis.Redis, tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, learn_every_votes=50, stream_batch_size=10)
    config = consumer_config(settings)
    calls: list[Settings] = []
    votes = synthetic_votes(120, seed=12)
    publish(client, votes[:60] + votes[:60])  # every vote twice: counted once
    drain(LearnerTrigger(client, settings, config, trigger=calls.append))
    assert calls == [settings] and votes_since_learner_run(client) == 10

    def broken(_settings: Settings) -> None:
        raise RuntimeError("broker down")

    publish(client, votes[60:])
    drain(LearnerTrigger(client, settings, config, trigger=broken))
    assert votes_since_learner_run(client) == 70  # the failed window counts again
    drain(LearnerTrigger(client, settings, config, trigger=None))  # learner not installed
    publish(client, synthetic_votes(5, seed=13))
    drain(LearnerTrigger(client, settings, config, trigger=calls.append))
    assert len(calls) == 2 and votes_since_learner_run(client) == 0


def test_learner_trigger_counts_votes_while_it_cannot_start(client: redis.Redis, tmp_path: Path,
                                                           redis_url: str) -> None:
    """Votes that arrive while an iteration runs, while a learner candidate waits for its
    decision, or while learning is paused are not lost: they count toward the next
    iteration, and the count is taken only when one really starts."""
    settings = make_settings(tmp_path, redis_url, learn_every_votes=50, stream_batch_size=10)
    config = consumer_config(settings)
    calls: list[Settings] = []
    answer: dict[str, object] = {"started": True}

    def trigger(s: Settings) -> dict[str, object]:
        calls.append(s)
        return answer

    votes = iter(synthetic_votes(300, seed=21))

    def vote(n: int) -> int:
        publish(client, [next(votes) for _ in range(n)])
        drain(LearnerTrigger(client, settings, config, trigger=trigger))
        return votes_since_learner_run(client)

    # An iteration runs (its lock is held): nothing starts, every vote counts.
    lock = IterationLock(client, 60)
    assert lock.acquire("running-task")
    assert vote(60) == 60 and calls == []
    lock.release("running-task")
    # The trigger answers "already running" (another trigger won the lock): nothing taken.
    answer = {"started": False, "task_id": "other", "message": "already running"}
    assert vote(10) == 70 and len(calls) == 1
    # A candidate the learner made waits for the loop's decision: no start, votes count.
    answer = {"started": True, "task_id": "new"}
    registry = Registry(client)
    registry.ensure_base()
    registry.add(VersionRecord(id="policy-v1", kind="policy", state="candidate", parent="base"),
                 actor=LEARNER_ACTOR)
    assert vote(10) == 80 and len(calls) == 1
    # Decided (rejected by the loop): the next vote starts an iteration and takes the 81.
    registry.retire("policy-v1", actor="loop")
    assert vote(1) == 0 and len(calls) == 2
    assert json.loads(client.get(LAST_TRIGGER_KEY))["votes"] == 81
    # Paused: votes count, nothing starts; resumed: the next vote starts one.
    set_paused(client, True)
    assert vote(55) == 55 and len(calls) == 2
    set_paused(client, False)
    assert vote(1) == 0 and len(calls) == 3


def test_stream_stats_and_trim(client: redis.Redis, sqlite_archive: Archive, tmp_path: Path,
                               redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    publish(client, synthetic_votes(200, seed=14))
    archiver = Archiver(client, sqlite_archive, consumer_config(settings))
    archiver.ensure_group()
    archiver.run_once()  # 64 of 200 delivered
    stats = stream_stats(client, sqlite_archive)
    assert stats["votes_stream"]["length"] == 200
    assert stats["votes_stream"]["groups"][ARCHIVER] == {"pending": 0, "lag": 136,
                                                         "consumers": 1}
    assert stats["archived"] == 64 and stats["dead_letters"] == 0
    import asyncio

    import redis.asyncio as aioredis

    async def figures() -> dict[str, float]:
        async_client = aioredis.Redis.from_url(redis_url)
        try:
            return await stream_figures(async_client)
        finally:
            await async_client.aclose()

    flat = asyncio.run(figures())
    assert flat["votes_stream_length"] == 200 and flat[f"lag_{ARCHIVER}"] == 136
    assert flat["archived_votes"] == 64  # as the archiver counted it
    drain(archiver)
    trim_acknowledged(client, VOTES_STREAM, required_groups=(ARCHIVER,))
    assert client.xlen(VOTES_STREAM) < 200  # acknowledged entries go (whole stream nodes)
    assert sqlite_archive.count() == 200


def test_run_consumers_in_one_process(client: redis.Redis, tmp_path: Path,
                                      redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, learn_every_votes=100)
    votes = synthetic_votes(250, seed=15)
    publish(client, votes)
    for i in range(5):
        client.xadd(CHATS_STREAM, {"session": "s", "model": "base", "ts": str(time.time()),
                                   "messages": json.dumps([{"role": "user", "content": f"{i}"}])})
    triggered: list[Settings] = []
    stop = threading.Event()
    runner = threading.Thread(target=run_consumers, args=(settings,),
                              kwargs={"stop": stop, "trigger": triggered.append})
    runner.start()
    archive = Archive(settings.effective_archive_url)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                archive.count() == 250 and archive.count_chat_turns() == 5
                and getattr(load_fit(client), "n_votes", 0) == 250 and len(triggered) == 2):
            time.sleep(0.1)
    finally:
        stop.set()
        runner.join(timeout=10)
        archive.close()
    assert not runner.is_alive()
    assert len(triggered) == 2 and votes_since_learner_run(client) < 100
    assert load_fit(client).n_votes == 250
    assert client.zcard(APPLIED_KEY) == 250


def test_run_consumers_rides_out_a_redis_restart(own_redis, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, own_redis.url, stream_block_ms=100)
    client = own_redis.client()
    votes = synthetic_votes(400, seed=16)
    stop = threading.Event()
    runner = threading.Thread(target=run_consumers, args=(settings,),
                              kwargs={"only": [ARCHIVER], "stop": stop})
    runner.start()
    archive = Archive(settings.effective_archive_url)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 20
        while archive.count() < n:
            assert time.monotonic() < deadline, f"{archive.count()} of {n} archived"
            time.sleep(0.05)

    try:
        publish(client, votes[:200])
        wait_for(200)
        own_redis.stop(signal.SIGKILL)
        time.sleep(0.5)  # the archiver sees Redis gone and backs off
        own_redis.start()
        publish(client, votes[200:])
        wait_for(400)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert sorted(archived_ids(archive)) == sorted(v.vote_id for v in votes)
    archive.close()
