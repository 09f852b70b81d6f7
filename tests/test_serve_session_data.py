"""A session sees and erases its own archived data (issue 14, privacy): real gateway, vLLM
(tiny model), Redis and the archivers on the SQLite archive."""

from __future__ import annotations

import httpx
import redis

from feedback.archive import Archive
from feedback.consumers import Archiver, ChatArchiver
from feedback.stream_consumer import ConsumerConfig

QUESTION = [{"role": "user", "content": "Tell me a secret."}]


def act(http: httpx.Client, url: str, vote: bool = True) -> None:
    """One archived chat turn and one voted battle for this client's session."""
    assert http.post(f"{url}/v1/chat/completions", json={
        "model": "base", "messages": QUESTION, "max_tokens": 2}).status_code == 200
    battle = http.post(f"{url}/v1/battles", json={"messages": QUESTION, "max_tokens": 2}).json()
    if vote:
        assert http.post(f"{url}/v1/battles/{battle['battle_id']}/vote",
                         json={"winner": "a"}).status_code == 200


def archive_streams(settings) -> None:
    client = redis.Redis.from_url(settings.effective_redis_url)
    archive = Archive(settings.effective_archive_url)
    for consumer in (Archiver(client, archive, ConsumerConfig(block_ms=10)),
                     ChatArchiver(client, archive, ConsumerConfig(block_ms=10))):
        consumer.ensure_group()
        while consumer.run_once():
            pass
    archive.close()


def test_a_session_sees_and_erases_only_its_own_data(gateway, gateway_settings):
    with httpx.Client(timeout=60) as mine, httpx.Client(timeout=60) as theirs:
        act(mine, gateway.url)
        act(theirs, gateway.url)
        archive_streams(gateway_settings)
        act(mine, gateway.url)  # still in the streams when the erasure comes

        shown = mine.get(f"{gateway.url}/v1/session/data").json()
        assert (shown["n_chat_turns"], shown["n_votes"]) == (1, 1)
        assert shown["chat_turns"][0]["messages"][0]["content"] == QUESTION[0]["content"]

        erased = mine.delete(f"{gateway.url}/v1/session/data")
        assert erased.status_code == 200, erased.text
        assert (erased.json()["erased_chat_turns"], erased.json()["erased_votes"]) == (1, 1)
        archive_streams(gateway_settings)  # the pending turn and vote are dropped, not stored
        shown = mine.get(f"{gateway.url}/v1/session/data").json()
        assert (shown["n_chat_turns"], shown["n_votes"]) == (0, 0)

        act(mine, gateway.url)  # what the session sends afterwards is kept as usual
        archive_streams(gateway_settings)
        assert mine.get(f"{gateway.url}/v1/session/data").json()["n_votes"] == 1
        assert theirs.get(f"{gateway.url}/v1/session/data").json()["n_votes"] == 1
    archive = Archive(gateway_settings.effective_archive_url)
    assert archive.count() == 2 and archive.count_chat_turns() == 2
    archive.close()
