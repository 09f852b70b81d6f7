"""Faults between the gateway and the model server, injected with a real TCP server that
misbehaves the way a dying vLLM does."""

from __future__ import annotations

import json
import socket
import threading

import openai
import pytest

from conftest import GatewayServer, free_port

PARTIAL_SSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n" % len(b'data: {"id":"x","object":"chat.completion.chunk","created":0,'
                      b'"model":"base","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n')
    + b'data: {"id":"x","object":"chat.completion.chunk","created":0,'
      b'"model":"base","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n\r\n'
)


def dying_upstream(port: int, stop: threading.Event) -> None:
    """Answers /health, and cuts every chat stream after its first chunk."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                request = conn.recv(65536)
                if request.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                else:
                    conn.sendall(PARTIAL_SSE)  # ...then the connection drops mid-stream


@pytest.fixture
def gateway_on_dying_upstream(settings):
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=dying_upstream, args=(port, stop), daemon=True)
    thread.start()
    server = GatewayServer(settings.model_copy(update={"vllm_urls": [f"http://127.0.0.1:{port}"]}))
    yield server
    server.stop()
    stop.set()
    thread.join()


def test_upstream_dying_mid_stream_ends_with_an_error_event(gateway_on_dying_upstream):
    client = openai.OpenAI(base_url=f"{gateway_on_dying_upstream.url}/v1", api_key="x",
                           max_retries=0)
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], stream=True)
    received = []
    with pytest.raises(openai.APIError, match="stopped mid-answer"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hel"]  # what came before the cut was delivered
    # The gateway itself is fine afterwards.
    models = client.models.list()
    assert "base" in [m.id for m in models.data]
    assert json.loads(models.to_json())["object"] == "list"
