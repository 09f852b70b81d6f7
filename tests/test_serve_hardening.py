"""The gateway against bad input and abuse (issue 12): each test sends what an attacker or a
careless client did and checks for a clear OpenAI-style 4xx (or 503/504), with nothing
archived and nothing stuck. Real gateway, real vLLM (tiny model); a fake model server where
vLLM cannot misbehave on demand."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from pydantic import ValidationError

from conftest import GatewayServer
from core.secrets import ensure_secret
from core.settings import Settings
from feedback.vote_record import VoteRecord
from feedback.vote_stream import CHATS_STREAM
from learner.prompt_pool import PromptPool
from learner.vote_source import JsonlVoteSource, write_jsonl
from serve.sessions import SessionMiddleware

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


def archived_turns(gateway: GatewayServer) -> list[list[dict]]:
    entries = redis.Redis.from_url(gateway.settings.effective_redis_url).xrange(CHATS_STREAM)
    return [json.loads(fields[b"messages"]) for _, fields in entries]


def wait_for_archived(gateway: GatewayServer, count: int) -> list[list[dict]]:
    """The chat turns once `count` are in the stream (archiving runs in the background)."""
    deadline = time.monotonic() + 10
    while len(turns := archived_turns(gateway)) < count:
        assert time.monotonic() < deadline, f"{len(turns)} chat turns archived, not {count}"
        time.sleep(0.05)
    return turns


@pytest.fixture
def capped_gateway(gateway_settings: Settings) -> Iterator[GatewayServer]:
    """A gateway with small caps, so that going past them is cheap."""
    server = GatewayServer(gateway_settings.model_copy(update={
        "max_body_bytes": 4096, "max_messages": 3, "max_message_chars": 100}))
    yield server
    server.stop()


# --- 1. bodies that used to answer 500 -------------------------------------------------------
def test_deeply_nested_vote_body_is_422(gateway):
    response = httpx.post(f"{gateway.url}/v1/battles/some-battle/vote", content=b"[" * 3000,
                          headers={"content-type": "application/json"})
    error = assert_openai_error(response, 422, "invalid_body")
    assert "not JSON" in error["message"]


@pytest.mark.parametrize("raw", [
    b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
    b'"presence_penalty": NaN}',
    b'{"model": "base", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
    b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "user": "\\udc00"}',
    b'{"model": "base", "messages": ' + b"[" * 3000,
], ids=["nan", "lone-surrogate-content", "lone-surrogate-field", "deep-nesting"])
def test_json_that_cannot_be_forwarded_is_422(gateway, raw):
    response = httpx.post(f"{gateway.url}{CHAT}", content=raw,
                          headers={"content-type": "application/json"})
    error = assert_openai_error(response, 422, "invalid_body")
    assert "not JSON" in error["message"]
    assert archived_turns(gateway) == []


# --- 2. content as a list of parts ---------------------------------------------------------
def test_text_parts_are_joined_and_archived_as_a_string(gateway):
    reply = client(gateway).chat.completions.create(
        model="base", max_tokens=2,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"},
                                               {"type": "text", "text": "there"}]}])
    assert reply.choices[0].message.content is not None
    [turn] = wait_for_archived(gateway, 1)
    assert turn == [{"role": "user", "content": "hello\nthere"}]


def test_non_text_parts_are_400_naming_the_part(gateway):
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(model="base", max_tokens=2, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert info.value.body["code"] == "unsupported_content"
    assert info.value.body["param"] == "messages.0.content.1"
    assert "image_url" in info.value.message


def test_learner_skips_and_counts_content_that_is_not_text(tmp_path: Path, caplog):
    parts = [{"type": "text", "text": "hello"}]
    caplog.set_level(logging.WARNING)
    pool = PromptPool(shipped=["a shipped prompt"], user=[
        [{"role": "user", "content": parts}],  # archived by a gateway before the fix
        [{"role": "user", "content": "a user prompt"}],
        [{"role": "user", "content": None}],
    ])
    assert pool.user == [[{"role": "user", "content": "a user prompt"}]]
    assert "skipped 2 of 3 user prompts" in caplog.text

    def vote(battle_id: str, content: object) -> VoteRecord:
        conversation = [{"role": "user", "content": content}]
        return VoteRecord(battle_id=battle_id, model_a="base", model_b="policy-v1", winner="a",
                          conversation_a=conversation, conversation_b=conversation,
                          answer_a="x", answer_b="y", session="s", battle_created_at=1.0,
                          voted_at=2.0)

    path = write_jsonl(tmp_path / "votes.jsonl", [vote("ok", "hi"), vote("parts", parts)])
    with path.open("a") as f:
        f.write('{"not": "a vote"}\n')
    assert [v.battle_id for v in JsonlVoteSource(path).votes()] == ["ok"]
    assert "skipped 1 of 2 votes" in caplog.text and "skipped 1 malformed" in caplog.text


# --- 3. nothing archived for a request that failed -----------------------------------------
def test_failed_chat_is_not_archived(gateway):
    too_long = [{"role": "user", "content": "word " * 2000}]
    for stream in (False, True):
        response = httpx.post(f"{gateway.url}{CHAT}", timeout=30, json={
            "model": "base", "messages": too_long, "max_tokens": 4, "stream": stream})
        assert_openai_error(response, 400)
    assert archived_turns(gateway) == []
    with httpx.stream("POST", f"{gateway.url}{CHAT}", timeout=30, json={
            "model": "base", "messages": HELLO, "max_tokens": 2, "stream": True}) as response:
        assert response.status_code == 200
        response.read()
    assert wait_for_archived(gateway, 1) == [HELLO]


# --- 4. size limits ------------------------------------------------------------------------
def test_oversized_body_is_413_and_conversation_caps_are_400(capped_gateway):
    url = f"{capped_gateway.url}{CHAT}"
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * 8000}]}
    assert_openai_error(httpx.post(url, json=big), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit counts what arrives
        yield json.dumps(big).encode()

    error = assert_openai_error(httpx.post(url, content=chunks(),
                                           headers={"content-type": "application/json"}),
                                413, "body_too_large")
    assert "4096" in error["message"]

    four = [{"role": "user", "content": "hi"}] * 4
    error = assert_openai_error(httpx.post(url, json={"model": "base", "messages": four}), 400,
                                "too_many_messages")
    assert "At most 3 messages" in error["message"]
    long_message = [{"role": "user", "content": "y" * 101}]
    error = assert_openai_error(httpx.post(url, json={"model": "base",
                                                      "messages": long_message}),
                                400, "message_too_long")
    assert error["param"] == "messages.0.content"
    battle = httpx.post(f"{capped_gateway.url}/v1/battles", json={"messages": long_message})
    assert_openai_error(battle, 400, "message_too_long")
    assert archived_turns(capped_gateway) == []


# --- 5. secrets ----------------------------------------------------------------------------
def test_empty_secret_setting_is_refused(monkeypatch):
    with pytest.raises(ValidationError, match="ARENA_ADMIN_TOKEN is set but empty"):
        Settings(_env_file=None, admin_token="")
    monkeypatch.setenv("ARENA_SESSION_SECRET", " ")
    with pytest.raises(ValidationError, match="ARENA_SESSION_SECRET is set but empty"):
        Settings(_env_file=None)


def test_empty_secret_files_are_regenerated_and_empty_bearer_refused(gateway_settings):
    settings = gateway_settings.model_copy(update={"admin_token": None, "session_secret": None})
    folder = settings.data_dir / "secrets"
    folder.mkdir(parents=True)
    for name in ("admin_token", "session_secret"):
        (folder / name).write_text("")  # what a crash between create and write left
    server = GatewayServer(settings)
    try:
        # `Bearer ` and nothing: HTTP drops the trailing space, the token is "".
        response = httpx.get(f"{server.url}/admin/versions",
                             headers={"Authorization": "Bearer"})
        assert_openai_error(response, 401, "invalid_admin_token")
        token = (folder / "admin_token").read_text().strip()
        assert len(token) >= 32 and len((folder / "session_secret").read_text().strip()) >= 32
        assert httpx.get(f"{server.url}/admin/versions",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        server.stop()


def test_secret_file_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    path = tmp_path / "secrets" / "admin_token"

    def crash(*_: object) -> None:
        raise OSError("crashed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crashed"):
        ensure_secret(settings, "admin_token")
    assert not path.exists() and os.listdir(path.parent) == [".lock"]
    monkeypatch.undo()
    token, created = ensure_secret(settings, "admin_token")
    assert created and path.read_text().strip() == token


# --- 6. upstream timeouts and the total deadline -------------------------------------------
@pytest.mark.parametrize("fake_model_server", ["hang"], indirect=True)
def test_upstream_timeouts_are_504_and_a_full_pool_503(settings, fake_model_server):
    server = GatewayServer(settings.model_copy(update={
        "vllm_urls": [fake_model_server.url], "request_timeout_s": 1.0,
        "upstream_max_connections": 1, "upstream_pool_timeout_s": 0.2,
        "replica_sync_interval_s": 3600.0}))
    body = {"model": "base", "messages": HELLO}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            first: list[httpx.Response] = []
            holder = threading.Thread(target=lambda: first.append(http.post(CHAT, json=body)))
            holder.start()
            assert fake_model_server.posted.wait(10)
            # The one upstream connection is taken: no wait for the read timeout.
            busy = http.post(CHAT, json={**body, "stream": True})
            assert_openai_error(busy, 503, "upstream_busy")
            assert busy.headers["retry-after"]
            holder.join(30)
            assert_openai_error(first[0], 504, "upstream_timeout")
    finally:
        server.stop()


@pytest.mark.parametrize("fake_model_server", ["flood"], indirect=True)
def test_stream_that_is_not_read_is_cut_at_its_deadline(settings, fake_model_server):
    server = GatewayServer(settings.model_copy(update={
        "vllm_urls": [fake_model_server.url], "answer_deadline_s": 1.0}))
    try:
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", f"{server.url}{CHAT}",
                json={"model": "base", "messages": HELLO, "stream": True}) as response:
            assert response.status_code == 200
            # Read a little, then no more. Keep the iterator: dropping it closes the connection.
            unread = response.iter_raw()
            next(unread)
            assert fake_model_server.closed.wait(15), "the upstream stream was never closed"
        assert httpx.get(f"{server.url}/livez").status_code == 200
    finally:
        server.stop()


# --- 7. the allow-list of forwarded fields -------------------------------------------------
def test_openai_client_fields_pass_and_unknown_fields_are_refused(gateway):
    stream = client(gateway).chat.completions.create(
        model="base", messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        max_completion_tokens=4, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3,
        presence_penalty=0.1, frequency_penalty=0.1, logprobs=True, top_logprobs=2,
        user="someone", response_format={"type": "text"}, n=1, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4

    url = f"{gateway.url}{CHAT}"
    response = httpx.post(url, json={"model": "base", "messages": HELLO,
                                     "tools": [{"type": "function"}]})
    error = assert_openai_error(response, 422, "invalid_body")
    assert error["param"] == "tools" and "unknown field" in error["message"]
    response = httpx.post(url, json={"model": "base", "messages": HELLO, "top_logprobs": 50})
    assert_openai_error(response, 422, "invalid_body")
    response = httpx.post(url, json={"model": "base", "messages": HELLO, "max_tokens": 10**12})
    error = assert_openai_error(response, 400, "max_tokens_too_large")
    assert "512" in error["message"]


# --- 8. the session-token cache --------------------------------------------------------------
def test_session_tokens_too_long_are_not_verified_and_bad_ones_not_cached():
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = SessionMiddleware(app, secret="test-session-secret")
    checked: list[str] = []
    verify = middleware.signer.loads
    middleware.signer.loads = lambda token: (checked.append(token), verify(token))[1]

    async def request(token: str) -> str:
        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(_: dict) -> None:
            pass

        scope = {"type": "http", "headers": [(b"cookie", f"arena_session={token}".encode())]}
        await middleware(scope, receive, send)
        return scope["state"]["session"]

    async def scenario() -> None:
        valid = middleware.signer.dumps("a-session")
        assert await request(valid) == "a-session" == await request(valid)
        assert checked == [valid]  # a valid token is checked once, then remembered
        assert await request("forged.token") != "a-session"
        await request("forged.token")
        assert checked[1:] == ["forged.token"] * 2  # an invalid one is never remembered
        await request("x" * 100_000)
        assert len(checked) == 3  # far longer than any token we issue: no HMAC at all

    asyncio.run(scenario())
