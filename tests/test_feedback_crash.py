"""A real archiver process killed with SIGKILL in the middle of a batch: a second one re-claims
what the first held, and every vote is in the archive exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from feedback.archive import Archive
from feedback.consumers import ARCHIVER
from feedback.vote_stream import DEAD_LETTER_STREAM, VOTES_STREAM, publish_vote_sync
from testkit.synthetic_votes import synthetic_votes

pytestmark = pytest.mark.slow  # starts, freezes and kills archiver processes

REPO = Path(__file__).resolve().parents[1]
N_VOTES = 4000
BATCH = 1000


def start_archiver(redis_url: str, archive_url: str, data_dir: Path, claim_idle_ms: int,
                   log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARENA_")}
    env.update({
        "ARENA_REDIS_URL": redis_url, "ARENA_ARCHIVE_URL": archive_url,
        "ARENA_DATA_DIR": str(data_dir), "ARENA_STREAM_BATCH_SIZE": str(BATCH),
        "ARENA_STREAM_CLAIM_IDLE_MS": str(claim_idle_ms), "ARENA_STREAM_BLOCK_MS": "100",
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
    })
    return subprocess.Popen([sys.executable, "-m", "arena.cli", "consumers", ARCHIVER], env=env,
                            cwd=data_dir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def freeze(pid: int) -> None:
    """SIGSTOP the process group and wait until it has stopped and what it had already sent
    has landed: kill() returns before the signal takes effect, and an XACK written to the
    socket just before is still applied by Redis after the process stopped."""
    os.killpg(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the archiver did not stop"
        time.sleep(0.001)
    time.sleep(0.05)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_archiver_killed_mid_batch(database: str, redis_url: str, tmp_path: Path,
                                   request: pytest.FixtureRequest) -> None:
    archive_url = (f"sqlite:///{tmp_path / 'archive.db'}" if database == "sqlite"
                   else request.getfixturevalue("postgres_url"))
    client = redis.Redis.from_url(redis_url)
    votes = synthetic_votes(N_VOTES, seed=20)
    with client.pipeline(transaction=False) as pipe:
        for vote in votes:
            publish_vote_sync(pipe, vote)
        pipe.execute()
    archive = Archive(archive_url)
    first = start_archiver(redis_url, archive_url, tmp_path, 60_000, tmp_path / "first.log")
    try:
        # Kill it once it has stored some votes and holds a delivered, unacknowledged batch
        # (frozen with SIGSTOP while we look, so the batch cannot be acknowledged meanwhile).
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            if archive.count() == 0:
                time.sleep(0.005)
                continue
            freeze(first.pid)
            stored = archive.count()
            if stored < N_VOTES - BATCH and client.xpending(VOTES_STREAM, ARCHIVER)["pending"]:
                os.killpg(first.pid, signal.SIGKILL)
                break
            os.killpg(first.pid, signal.SIGCONT)
            time.sleep(0.005)
        first.wait()
        assert client.xpending(VOTES_STREAM, ARCHIVER)["pending"] > 0
        assert archive.count() < N_VOTES

        second = start_archiver(redis_url, archive_url, tmp_path, 300, tmp_path / "second.log")
        try:
            deadline = time.monotonic() + 40
            while archive.count() < N_VOTES or client.xpending(VOTES_STREAM, ARCHIVER)["pending"]:
                assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-2000:]
                assert second.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
                time.sleep(0.1)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0  # a clean stop on SIGTERM
        ids = [stored.record.vote_id for stored in archive.iter_votes()]
        assert len(ids) == len(set(ids)) == N_VOTES
        assert set(ids) == {vote.vote_id for vote in votes}
        assert client.xlen(DEAD_LETTER_STREAM) == 0
        assert "re-claimed" in (tmp_path / "second.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        archive.close()
