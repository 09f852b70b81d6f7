"""Nothing in Redis or the data dir grows per vote (or per iteration) without bound, and the
gateway refuses a Redis that can lose accepted votes. Real Redis and PostgreSQL throughout:
the counted vote ids are forgotten after the dedup window (and not before), the vote stream
is trimmed to what every group acknowledged, dead letters are capped and replayable without
double counting, rollback history is bounded, finished tasks' checkpoint folders go,
`arena gc` deletes retired weights only on request, and logs rotate."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis
from celery import states
from fastapi.testclient import TestClient
from test_feedback_consumers import drain, publish
from test_feedback_consumers import make_settings as consumer_settings
from typer.testing import CliRunner

from arena.cli import app as cli_app
from arena.logfiles import RotatingLogFile
from core.redis_durability import VolatileRedis, check_durability
from core.settings import Settings
from deploy.registry import PREVIOUS_KEY, Registry, VersionRecord
from elo.online_elo import replay
from elo.ratings_store import APPLIED_KEY, load_online
from feedback.archive import Archive
from feedback.consumers import Archiver, Ranker, consumer_config, housekeeping
from feedback.vote_record import VoteRecord
from feedback.vote_stream import DEAD_LETTER_STREAM, RECORD_FIELD, VOTES_STREAM
from learner import artifacts
from learner.celery_app import make_celery
from learner.trigger import COUNTED_KEY as LEARNER_COUNTED_KEY
from learner.trigger import start_iteration
from learner.vote_trigger import LearnerTrigger, votes_since_learner_run
from serve.app import create_app
from testkit.synthetic_votes import synthetic_votes


def make_settings(tmp_path: Path, redis_url: str, **overrides: object) -> Settings:
    """As the consumer tests', with the learner never triggered."""
    return consumer_settings(tmp_path, redis_url, **{"learn_every_votes": 10**9, **overrides})


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def archive(postgres_url: str) -> Archive:
    archive = Archive(postgres_url)
    yield archive
    archive.close()


def elo_of(votes: Sequence[VoteRecord], settings: Settings) -> dict[str, float]:
    return replay([(v.model_a, v.model_b, v.winner) for v in votes], k=settings.elo_k)


# --- counted vote ids -----------------------------------------------------------------------
def test_counted_vote_ids_are_forgotten_after_the_dedup_window(
        client: redis.Redis, archive: Archive, tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, stream_dedup_ttl_s=3, stream_replay_window_s=1)
    config = consumer_config(settings)
    votes = synthetic_votes(100, seed=31)
    publish(client, votes)
    consumers = (Ranker(client, settings.elo_k, config), LearnerTrigger(client, settings, config))
    drain(*consumers)
    assert client.zcard(APPLIED_KEY) == client.zcard(LEARNER_COUNTED_KEY) == 100

    # Delivered again inside the window: remembered, so counted once.
    publish(client, votes)
    drain(*consumers)
    housekeeping(client, archive, settings, also_forget=(LEARNER_COUNTED_KEY,))
    assert load_online(client) == pytest.approx(elo_of(votes, settings))
    assert votes_since_learner_run(client) == 100
    assert client.zcard(APPLIED_KEY) == client.zcard(LEARNER_COUNTED_KEY) == 100

    time.sleep(3.2)  # past the dedup window: the ids go, whatever their number
    housekeeping(client, archive, settings, also_forget=(LEARNER_COUNTED_KEY,))
    assert client.exists(APPLIED_KEY, LEARNER_COUNTED_KEY) == 0


def test_a_legacy_set_of_counted_ids_is_kept_as_scored_ids(
        client: redis.Redis, archive: Archive, tmp_path: Path, redis_url: str) -> None:
    """A Redis from before the dedup window holds plain sets: they are converted in place,
    and the ids in them still count as counted."""
    settings = make_settings(tmp_path, redis_url)
    votes = synthetic_votes(20, seed=32)
    client.sadd(APPLIED_KEY, *(v.vote_id for v in votes[:10]))
    client.sadd(LEARNER_COUNTED_KEY, *(v.vote_id for v in votes[:10]))
    publish(client, votes)
    config = consumer_config(settings)
    drain(Ranker(client, settings.elo_k, config), LearnerTrigger(client, settings, config))
    assert client.type(APPLIED_KEY) == client.type(LEARNER_COUNTED_KEY) == b"zset"
    assert load_online(client) == pytest.approx(elo_of(votes[10:], settings))
    assert votes_since_learner_run(client) == 10
    scores = [score for _, score in client.zrange(APPLIED_KEY, 0, -1, withscores=True)]
    assert all(abs(score - time.time()) < 60 for score in scores)
    # nothing to convert any more, nothing forgotten
    housekeeping(client, archive, settings, also_forget=(LEARNER_COUNTED_KEY,))
    assert client.zcard(APPLIED_KEY) == client.zcard(LEARNER_COUNTED_KEY) == 20


# --- the vote stream ------------------------------------------------------------------------
def test_vote_stream_trimmed_to_what_every_group_acknowledged(
        client: redis.Redis, archive: Archive, tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    config = consumer_config(settings)
    votes = synthetic_votes(1000, seed=33)
    publish(client, votes)
    archiver, ranker = Archiver(client, archive, config), Ranker(client, settings.elo_k, config)
    trigger = LearnerTrigger(client, settings, config)
    drain(archiver, ranker)
    trigger.ensure_group()
    trigger.run_once()  # the slowest group has read 64 of 1000
    housekeeping(client, archive, settings, also_forget=(LEARNER_COUNTED_KEY,))
    last_read = next(group["last-delivered-id"].decode()
                     for group in client.xinfo_groups(VOTES_STREAM)
                     if group["name"] == trigger.group.encode())
    assert len(client.xrange(VOTES_STREAM, min=f"({last_read}")) == 1000 - 64

    drain(trigger)
    housekeeping(client, archive, settings, also_forget=(LEARNER_COUNTED_KEY,))
    assert client.xlen(VOTES_STREAM) < 100  # at most a part of the last stream node
    assert archive.count() == 1000


# --- dead letters ---------------------------------------------------------------------------
def test_dead_letters_are_capped(client: redis.Redis, archive: Archive, tmp_path: Path,
                                 redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, stream_dead_letter_maxlen=50)
    with client.pipeline(transaction=False) as pipe:
        for i in range(600):
            pipe.xadd(VOTES_STREAM, {RECORD_FIELD: f"not json {i}"})
        pipe.execute()
    drain(Archiver(client, archive, consumer_config(settings)))
    # Trimmed a whole stream node at a time (`XADD MAXLEN ~`): the newest are kept.
    assert 50 <= client.xlen(DEAD_LETTER_STREAM) < 200
    (_id, newest), = client.xrevrange(DEAD_LETTER_STREAM, count=1)
    assert "not json 599" in json.loads(newest[b"fields"])[RECORD_FIELD]


class PoisonedArchiver(Archiver):
    """Fails on one vote id, every time (a bug)."""

    def __init__(self, *args: object, poison: str) -> None:
        super().__init__(*args)
        self.poison = poison

    def process(self, entry_ids: Sequence[str], items: Sequence[VoteRecord]) -> None:
        if any(item.vote_id == self.poison for item in items):
            raise RuntimeError("cannot store this one")
        super().process(entry_ids, items)


def test_dead_letter_replay_counts_each_vote_once(
        client: redis.Redis, archive: Archive, tmp_path: Path, redis_url: str,
        postgres_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    config = consumer_config(settings)
    votes = synthetic_votes(40, seed=34)
    poisoned = votes[7]
    publish(client, votes)
    client.xadd(VOTES_STREAM, {RECORD_FIELD: "{not a vote"})
    ranker, trigger = Ranker(client, settings.elo_k, config), LearnerTrigger(client, settings,
                                                                            config)
    drain(PoisonedArchiver(client, archive, config, poison=poisoned.vote_id), ranker, trigger)
    assert archive.count() == 39  # the ranker and the trigger counted all 40
    # A dead letter from long ago: its id may be forgotten, so it is not replayed.
    old = {"original_id": "1000-0", "stream": VOTES_STREAM, "group": "archiver",
           "consumer": "gone", "reason": "failed 3 times", "deliveries": 3, "dead_at": 1.0,
           "fields": json.dumps({RECORD_FIELD: votes[0].to_json()})}
    client.xadd(DEAD_LETTER_STREAM, old)

    env = {"ARENA_REDIS_URL": redis_url, "ARENA_DATA_DIR": str(settings.data_dir),
           "ARENA_ARCHIVE_URL": postgres_url, "COLUMNS": "300"}

    def arena(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli_app, list(args), env=env)
        assert result.exit_code == code, result.output
        return result.output

    listing = arena("dead-letters", "list")
    assert poisoned.vote_id in listing and "cannot store this one" in listing
    assert "malformed" in listing
    arena("dead-letters", "replay", code=2)  # neither ids nor --all
    out = arena("dead-letters", "replay", "--all")
    assert "replayed 1" in out and "older than the replay window" in out
    assert client.xlen(DEAD_LETTER_STREAM) == 4  # the old one, the malformed one (x3 groups)
    replayed, = client.xrevrange(VOTES_STREAM, count=1)
    first_id = replayed[1][b"replay_of"].decode()

    drain(Archiver(client, archive, config), ranker, trigger)
    assert sorted(s.record.vote_id for s in archive.iter_votes()) == sorted(
        v.vote_id for v in votes)
    assert load_online(client) == pytest.approx(elo_of(votes, settings))
    assert votes_since_learner_run(client) == 40

    # The same vote replayed again (say, a dead letter restored from a copy): archived and
    # counted already, it changes nothing, and keeps the id it was first queued under.
    again = client.xadd(DEAD_LETTER_STREAM, {
        **old, "original_id": "0-1", "dead_at": time.time(),
        "fields": json.dumps({RECORD_FIELD: poisoned.to_json(), "replay_of": first_id})})
    assert "replayed 1" in arena("dead-letters", "replay", again.decode())
    drain(Archiver(client, archive, config), ranker, trigger)
    assert archive.count() == 40
    assert load_online(client) == pytest.approx(elo_of(votes, settings))
    assert votes_since_learner_run(client) == 40
    assert client.zcard(APPLIED_KEY) == client.zcard(LEARNER_COUNTED_KEY) == 40


# --- rollback history -----------------------------------------------------------------------
def test_rollback_history_stays_bounded(client: redis.Redis) -> None:
    registry = Registry(client)
    registry.ensure_base()
    for version in ("policy-v1", "policy-v2", "policy-v3"):
        registry.add(VersionRecord(id=version, kind="policy", state="candidate", parent="base"))
    for i in range(300):
        registry.promote(("policy-v1", "policy-v2")[i % 2], actor="test")
    assert client.llen(PREVIOUS_KEY) <= 3  # each earlier current once
    assert registry.current() == "policy-v2"
    registry.promote("policy-v3", actor="test")
    registry.retire("policy-v2", actor="test")  # a retired version is no rollback target
    assert b"policy-v2" not in client.lrange(PREVIOUS_KEY, 0, -1)
    assert registry.rollback(actor="test") == ("policy-v3", "policy-v1")
    assert registry.rollback(actor="test") == ("policy-v1", "base")


# --- the data dir ---------------------------------------------------------------------------
def test_finished_tasks_checkpoint_folders_are_removed(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, learner_lock_ttl_s=600)
    backend = make_celery(settings).backend
    work = settings.versions_dir / artifacts.WORK_DIR
    folders = {name: work / name for name in (
        "done-rm", "done-policy", "failed-policy", "cancelled", "running-policy",
        "queued-policy", "vanished-policy")}
    for folder in folders.values():
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "step-2.pt").write_bytes(b"weights")
    backend.store_result("done", {"status": "done"}, states.SUCCESS)
    backend.store_result("failed", RuntimeError("training diverged"), states.FAILURE)
    backend.store_result("cancelled", None, states.REVOKED)
    backend.store_result("running", {"phase": "policy", "step": 2}, "PROGRESS")
    # No result at all (never ran, or its result expired): kept while recently written.
    long_ago = time.time() - 3600
    for path in folders["vanished-policy"].rglob("*"):
        os.utime(path, (long_ago, long_ago))

    assert start_iteration(settings)["started"]
    left = sorted(p.name for p in work.iterdir())
    assert left == ["queued-policy", "running-policy"]


def retired_version(settings: Settings, registry: Registry, version: str, parent: str,
                    state: str = "retired") -> Path:
    folder = settings.versions_dir / version
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 4096)
    (folder / "sub" / "value_head.pt").write_bytes(b"v" * 1024)
    (folder / "manifest.json").write_text(json.dumps({"id": version, "metrics": {"r": 1}}))
    registry.add(VersionRecord(id=version, kind="policy", state=state, parent=parent,
                               path=str(folder)))
    return folder


def test_gc_deletes_retired_weights_only_on_request(client: redis.Redis, tmp_path: Path,
                                                    redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    registry = Registry(client, settings.data_dir / "audit.log")
    registry.ensure_base()
    v1 = retired_version(settings, registry, "policy-v1", "base")
    v2 = retired_version(settings, registry, "policy-v2", "policy-v1")
    v3 = retired_version(settings, registry, "policy-v3", "policy-v2", state="candidate")
    outside = retired_version(Settings(_env_file=None, data_dir=tmp_path / "elsewhere"),
                              registry, "policy-v4", "base")
    env = {"ARENA_REDIS_URL": redis_url, "ARENA_DATA_DIR": str(settings.data_dir),
           "COLUMNS": "300"}

    def files(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    everything = {folder: files(folder) for folder in (v1, v2, v3, outside)}
    result = CliRunner().invoke(cli_app, ["gc"], env=env)
    assert result.exit_code == 0, result.output
    assert "parent of live policy-v3" in result.output
    assert "outside the version store" in result.output
    result = CliRunner().invoke(cli_app, ["gc", "--delete-retired"], env=env, input="n\n")
    assert result.exit_code == 1, result.output  # not confirmed
    assert {folder: files(folder) for folder in everything} == everything

    result = CliRunner().invoke(cli_app, ["gc", "--delete-retired", "--yes"], env=env)
    assert result.exit_code == 0, result.output
    assert files(v1) == ["manifest.json"] and not (v1 / "sub").exists()
    assert {folder: files(folder) for folder in (v2, v3, outside)} == {
        folder: everything[folder] for folder in (v2, v3, outside)}
    audit = (settings.data_dir / "audit.log").read_text().splitlines()
    assert [entry["version"] for entry in map(json.loads, audit)
            if entry["action"] == "gc"] == ["policy-v1"]


def test_logs_rotate(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "worker.log"
    with RotatingLogFile(path, max_bytes=1000, backups=2) as log:
        for i in range(200):
            log.write(f"line {i:03d} [/x] 100% done\n")
            log.flush()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["worker.log", "worker.log.1", "worker.log.2"]
    assert all(p.stat().st_size <= 1000 for p in path.parent.iterdir())
    assert path.read_text().splitlines()[-1] == "line 199 [/x] 100% done"


# --- the Redis the gateway accepts votes on -------------------------------------------------
def start_gateway(settings: Settings) -> None:
    """Run the gateway's start-up (lifespan) and shut it down again."""
    with TestClient(create_app(settings)):
        pass


async def idle(*_args: object) -> None:
    await asyncio.Event().wait()


def test_gateway_refuses_a_redis_that_can_lose_votes(own_redis, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The replica sync loop can lose its cancellation when the gateway stops during its first
    # pass, and the shutdown then waits forever; this test is about the start, so without it.
    monkeypatch.setattr("serve.app.replica_sync_loop", idle)
    settings = make_settings(tmp_path, own_redis.url, session_secret="s", admin_token="t")
    client = own_redis.client()
    # Our own Redis (arena/redis_server.py) is safe as started: AOF, fsync always, no eviction.
    assert check_durability(client).problems == check_durability(client).warnings == []
    start_gateway(settings)

    client.config_set("appendonly", "no")
    with pytest.raises(VolatileRedis, match="appendonly is 'no'"):
        start_gateway(settings)
    start_gateway(settings.model_copy(update={"allow_volatile_redis": True}))

    client.config_set("appendonly", "yes")
    client.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(VolatileRedis, match="maxmemory-policy is 'allkeys-lru'"):
        start_gateway(settings)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("appendfsync", "everysec")
    assert check_durability(client).problems == []
    assert "everysec" in check_durability(client).warnings[0]
    start_gateway(settings)

    # A Redis that does not let us read its configuration cannot be trusted blindly.
    client.acl_setuser("voter", enabled=True, nopass=True, keys=["*"], channels=["*"],
                       commands=["+@all", "-config"])
    voter_url = own_redis.url.replace("redis://", "redis://voter:any@")
    limited = settings.model_copy(update={"redis_url": voter_url})
    with pytest.raises(VolatileRedis, match="CONFIG GET was refused"):
        start_gateway(limited)
