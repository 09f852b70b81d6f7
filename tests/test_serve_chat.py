"""The OpenAI-compatible routes against a real vLLM server (tiny model, two LoRA versions),
through the official `openai` client."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from conftest import GatewayServer, free_port


def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_versions_and_current_alias(gateway, two_policies):
    models = {m.id: m for m in client(gateway).models.list().data}
    assert set(models) == {"base", "current", *two_policies}
    assert models["base"].model_extra["state"] == "current"
    assert models["policy-v1"].model_extra["state"] == "candidate"
    assert models["policy-v1"].model_extra["parent"] == "base"
    assert models["current"].model_extra["alias_of"] == "base"


def test_chat_current_resolves_to_concrete_version(gateway):
    reply = client(gateway).chat.completions.create(
        model="current", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert reply.model == "base"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8


def test_chat_all_sampling_parameters_pass_through(gateway):
    c = client(gateway)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    first = c.chat.completions.create(model="base", messages=messages, max_tokens=12,
                                      temperature=1.0, top_p=0.9, seed=7, n=2)
    again = c.chat.completions.create(model="base", messages=messages, max_tokens=12,
                                      temperature=1.0, top_p=0.9, seed=7, n=2)
    assert len(first.choices) == 2
    # A fixed seed makes sampling reproducible.
    assert [ch.message.content for ch in first.choices] == [ch.message.content
                                                            for ch in again.choices]
    stopped = c.chat.completions.create(model="base", messages=messages, max_tokens=30,
                                        temperature=0, stop=[" "])
    assert stopped.choices[0].finish_reason == "stop" or " " not in \
        stopped.choices[0].message.content.strip()


def test_lora_version_answers_differently_from_base(gateway, two_policies):
    c = client(gateway)
    question = [{"role": "user", "content": "Tell me something."}]
    answers = {}
    for version in ("base", *two_policies):
        reply = c.chat.completions.create(model=version, messages=question, max_tokens=12,
                                          temperature=0)
        assert reply.model == version
        answers[version] = reply.choices[0].message.content
    assert len(set(answers.values())) == 3


def test_streaming_with_sync_and_async_clients(gateway, two_policies):
    stream = client(gateway).chat.completions.create(
        model="policy-v2", messages=[{"role": "user", "content": "Count."}], max_tokens=10,
        stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"policy-v2"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async def one(i: int) -> str:
            reply = await aclient.chat.completions.create(
                model="current", messages=[{"role": "user", "content": f"Hi {i}"}],
                max_tokens=6)
            return reply.choices[0].message.content
        async def streamed() -> str:
            parts = []
            async for chunk in await aclient.chat.completions.create(
                    model="base", messages=[{"role": "user", "content": "Go"}], max_tokens=6,
                    stream=True):
                parts.extend(ch.delta.content or "" for ch in chunk.choices)
            return "".join(parts)
        results = await asyncio.gather(*(one(i) for i in range(4)), streamed())
        await aclient.close()
        return list(results)

    assert all(asyncio.run(run()))


def test_unknown_model_is_404_naming_the_available_ones(gateway):
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway).chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert "gpt-17" in info.value.message and "current" in info.value.message
    assert info.value.body["code"] == "model_not_found"


def test_retired_version_is_404(gateway, registry, two_policies):
    registry.retire("policy-v1", actor="test")
    with pytest.raises(openai.NotFoundError, match="retired"):
        client(gateway).chat.completions.create(
            model="policy-v1", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_context_is_400_with_the_limit(gateway):
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "word " * 2000}], max_tokens=4)
    assert "512" in info.value.message


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}]},  # no model
    {"model": "base", "messages": []},  # no message
    {"model": "base", "messages": [{"role": "robot", "content": "x"}]},  # bad role
    {"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
])
def test_malformed_body_is_422_in_openai_format(gateway, body):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_non_json_body_is_422(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "error" in response.json()


def test_vllm_unavailable_is_503_with_retry_after(settings):
    dead = settings.model_copy(update={"vllm_urls": [f"http://127.0.0.1:{free_port()}"]})
    server = GatewayServer(dead)
    try:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "upstream_unavailable"
        health = httpx.get(f"{server.url}/healthz")
        assert health.status_code == 503
        assert any("vllm" in p for p in health.json()["problems"])
    finally:
        server.stop()


def _vllm_counters(vllm_url: str) -> tuple[float, float]:
    """(requests finished for any reason, requests running or waiting) from vLLM's Prometheus
    metrics. vLLM 0.32 does not count client aborts as finished, so an aborted request never
    shows."""
    finished = busy = 0.0
    for line in httpx.get(f"{vllm_url}/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total"):
            finished += float(line.rsplit(" ", 1)[1])
        elif line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            busy += float(line.rsplit(" ", 1)[1])
    return finished, busy


def _wait_until_idle(vllm_url: str, timeout_s: float = 60) -> float:
    """Finished count once the shared server has nothing in flight (an earlier test's
    generation finishing mid-test would otherwise be counted as ours)."""
    deadline = time.monotonic() + timeout_s
    while True:
        finished, busy = _vllm_counters(vllm_url)
        if busy == 0:
            return finished
        assert time.monotonic() < deadline, "vLLM never went idle"
        time.sleep(0.2)


def test_client_disconnect_mid_stream_aborts_generation(gateway, vllm_server):
    finished_before = _wait_until_idle(vllm_server.url)
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{gateway.url}/v1/chat/completions",
            json={"model": "base", "messages": [{"role": "user", "content": "Go on"}],
                  "max_tokens": 450, "stream": True, "ignore_eos": True}) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                break  # leave mid-stream: closing the connection is the disconnect
    # Had it run on, it would have finished (reason "length") and been counted.
    assert _wait_until_idle(vllm_server.url, timeout_s=20) == finished_before


def test_rate_limit_is_429_with_retry_after(gateway_settings):
    limited = gateway_settings.model_copy(update={"rate_chat_per_session": 2})
    server = GatewayServer(limited)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"model": "base", "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 2}
            codes = [http.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            response = http.post("/v1/chat/completions", json=body)
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.json()["error"]["type"] == "rate_limit_error"
        # Another session (fresh cookie jar) is not limited by the first one's count.
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body,
                          timeout=30).status_code == 200
    finally:
        server.stop()


def test_metrics_count_requests_and_tokens_per_version(gateway, two_policies):
    client(gateway).chat.completions.create(
        model="policy-v1", messages=[{"role": "user", "content": "x"}], max_tokens=5)
    text = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r'arena_requests_total\{route="chat",version="policy-v1"\} 1\.0', text)
    assert re.search(r'arena_completion_tokens_total\{route="chat",version="policy-v1"\} 5\.0',
                     text)
    assert "arena_request_seconds_bucket" in text


def test_healthz_reports_each_part(gateway):
    report = httpx.get(f"{gateway.url}/healthz").json()
    assert report["redis"] is True
    assert all(report["vllm"].values())
    assert "worker" in report


def test_healthz_is_200_with_a_worker(gateway_settings, celery_worker):
    server = GatewayServer(gateway_settings)
    try:
        deadline = time.monotonic() + 20
        while (response := httpx.get(f"{server.url}/healthz")).status_code != 200:
            assert time.monotonic() < deadline, response.json()
            time.sleep(0.5)
        assert response.json()["worker"] is True
    finally:
        server.stop()
