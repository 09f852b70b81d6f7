"""Deploy on the real stack: the tiny model in a real vLLM server, the gateway app served by
uvicorn in a thread, the real Redis, the official `openai` client. Promote and rollback under
a steady stream of chat requests, refused checkpoints, the operator token, retirement, the
replica sync and the CLI (the loop's controls: tests/test_deploy_loop_admin.py)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis
import uvicorn
from typer.testing import CliRunner

from arena.cli import app as cli_app
from core.settings import Settings
from deploy.admin_client import AdminClient, AdminError
from deploy.manifest import Manifest, hash_folder, write_manifest
from deploy.registry import Registry
from deploy.store import register_adapter
from serve.app import create_app
from testkit.net import free_port
from testkit.tiny_model import build_lora_adapter

TOKEN = "test-admin-token"
CLIENTS = 4
PROMPT = [{"role": "user", "content": "Say something."}]




def vllm_adapters(vllm_url: str) -> dict[str, str]:
    models = httpx.get(f"{vllm_url}/v1/models", timeout=5).json()["data"]
    return {m["id"]: m.get("root") for m in models if m["id"] != "base"}


@pytest.fixture
def clean_vllm(vllm_server) -> str:
    """The session's vLLM server with no adapter loaded (each test's registry starts afresh,
    so names from an earlier test must not linger)."""
    for name in vllm_adapters(vllm_server.url):
        httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name})
    return vllm_server.url


@dataclass
class Gateway:
    url: str
    settings: Settings
    vllm_url: str

    def admin(self, token: str = TOKEN) -> AdminClient:
        return AdminClient(self.url, token, actor="pytest")

    def registry(self) -> Registry:
        return Registry(redis.Redis.from_url(self.settings.effective_redis_url))


@pytest.fixture
def gateway(settings: Settings, clean_vllm: str) -> Iterator[Gateway]:
    settings.vllm_urls = [clean_vllm]
    settings.replica_sync_interval_s = 0.5
    for limit in ("rate_chat_per_session", "rate_chat_per_ip", "rate_battle_per_session",
                  "rate_battle_per_ip"):
        setattr(settings, limit, 0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    yield Gateway(f"http://127.0.0.1:{port}", settings, clean_vllm)
    server.should_exit = True
    thread.join(timeout=15)


class ChatLoad:
    """CLIENTS threads, each looping on chat completions with model="current" through the
    official openai client (no retries: every failure counts)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, float, str | None, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(CLIENTS)]

    def _loop(self) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                reply = client.chat.completions.create(model="current", messages=PROMPT,
                                                       max_tokens=8, temperature=0)
                outcome = (reply.model, None)
            except openai.OpenAIError as error:
                outcome = (None, repr(error))
            self.results.append((started, time.monotonic(), *outcome))

    def wait_for(self, n: int, started_after: float = 0.0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for r in self.results if r[0] > started_after) < n:
            assert time.monotonic() < deadline, "the chat load made no progress"
            time.sleep(0.05)

    def __enter__(self) -> ChatLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def failures(self) -> list[str]:
        return [r[3] for r in self.results if r[3] is not None]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def refused(call: Callable[[], object]) -> AdminError:
    with pytest.raises(AdminError) as info:
        call()
    return info.value


def api_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


# --- hot swap under load -----------------------------------------------------------------
def test_promote_and_rollback_under_load(gateway: Gateway, lora_adapters: list[Path]) -> None:
    with gateway.admin() as admin:
        v1, v2 = (admin.register(path) for path in lora_adapters)
        assert (v1["id"], v1["state"], v2["id"], v2["state"]) == (
            "policy-v1", "candidate", "policy-v2", "candidate")
        # a new version is in every replica as soon as it is registered, by its own name
        assert vllm_adapters(gateway.vllm_url) == {"policy-v1": v1["path"],
                                                   "policy-v2": v2["path"]}
        flips = []
        with ChatLoad(gateway.url) as load:
            load.wait_for(8)
            for arg in ("policy-v1", "policy-v2", None):  # None: rollback
                called = time.monotonic()
                result = admin.promote(arg) if arg else admin.rollback()
                done = time.monotonic()
                flips.append((called, done, result))
                load.wait_for(8, started_after=done)

    assert load.failures() == []
    assert [(r["action"], r["before"]["current"], r["after"]["current"]) for *_, r in flips] == [
        ("promote", "base", "policy-v1"), ("promote", "policy-v1", "policy-v2"),
        ("rollback", "policy-v2", "policy-v1")]
    assert flips[0][2]["after"]["states"] == {"policy-v1": "current", "base": "candidate"}
    served = {r[2] for r in load.results}
    assert served <= {"base", "policy-v1", "policy-v2"}
    bounds = [(0.0, 0.0, None)] + flips + [(float("inf"), float("inf"), None)]
    for (_, prev_done, _), (called, done, result), (next_called, *_rest) in zip(
            bounds, bounds[1:], bounds[2:], strict=False):
        old, new = result["before"]["current"], result["after"]["current"]
        # finished before the flip began: the old version; started after it: the new one
        assert {r[2] for r in load.results if prev_done < r[0] and r[1] < called} <= {old}
        after = [r for r in load.results if done < r[0] and r[1] < next_called]
        assert after and {r[2] for r in after} == {new}
        swap_s = min(r[1] for r in load.results if r[2] == new and r[0] > called) - called
        print(f"{result['action']} {new}: call {result['seconds']:.3f} s, "
              f"first response from it {swap_s:.3f} s after the call")
        assert result["seconds"] < 5.0

    record = gateway.registry().get("policy-v1")
    assert record.state == "current" and record.promoted_by == "pytest"
    audit = (gateway.settings.data_dir / "audit.log").read_text()
    assert audit.count('"action": "promote"') == 3 and '"action": "rollback"' in audit


def test_running_requests_finish_on_their_version(gateway: Gateway,
                                                  lora_adapters: list[Path]) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)

    def long_stream(model: str) -> Iterator[openai.types.chat.ChatCompletionChunk]:
        return iter(client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=48, stream=True,
            extra_body={"ignore_eos": True}))

    with gateway.admin() as admin:
        v1, v2 = (admin.register(path)["id"] for path in lora_adapters)
        on_current, on_v2 = long_stream("current"), long_stream(v2)
        first = [next(on_current), next(on_v2)]  # both are generating now
        admin.promote(v1)  # `current` flips while the first stream runs
        admin.retire(v2)  # v2 is unloaded while the second stream runs
        rest = [list(on_current), list(on_v2)]
    for head, tail, model in zip(first, rest, ("base", v2), strict=True):
        chunks = [head, *tail]
        assert {c.model for c in chunks} == {model}
        assert chunks[-1].choices[0].finish_reason == "length"
    reply = client.chat.completions.create(model="current", messages=PROMPT, max_tokens=4)
    assert reply.model == v1


# --- refused checkpoints -------------------------------------------------------------------
def test_refused_checkpoints_leave_serving_untouched(gateway: Gateway, lora_adapters: list[Path],
                                                    tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    corrupt = shutil.copytree(lora_adapters[0], tmp_path / "corrupt")
    write_manifest(corrupt, Manifest(files=hash_folder(corrupt)))
    weights = corrupt / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    missing = shutil.copytree(lora_adapters[0], tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    big_rank = build_lora_adapter(tiny_model_dir, tmp_path / "r64", seed=5, rank=64)

    with gateway.admin() as admin, ChatLoad(gateway.url) as load:
        current = admin.register(lora_adapters[0])["id"]
        admin.promote(current)
        promoted = time.monotonic()
        for src, code, words in ((corrupt, "checkpoint_corrupt", "sha256"),
                                 (missing, "checkpoint_missing", "adapter_model.safetensors"),
                                 (big_rank, "checkpoint_incompatible", "rank 64"),
                                 (tmp_path / "nowhere", "checkpoint_missing", "not a folder")):
            with pytest.raises(AdminError) as info:
                admin.register(src)
            assert (info.value.status, info.value.code) == (400, code)
            assert words in info.value.message and "refused" in info.value.message
        load.wait_for(8, started_after=time.monotonic())
        listing = admin.versions()

    assert load.failures() == []
    assert {r[2] for r in load.results if r[0] > promoted} == {current}
    assert [v["id"] for v in listing["data"]] == ["base", current]
    assert listing["current"] == current
    assert sorted(p.name for p in gateway.settings.versions_dir.iterdir()) == [current]
    assert set(vllm_adapters(gateway.vllm_url)) == {current}


# --- operator token, bad names and transitions --------------------------------------------
def test_operator_calls_need_the_token(gateway: Gateway, lora_adapters: list[Path],
                                       caplog: pytest.LogCaptureFixture) -> None:
    calls = [("GET", "/admin/versions", None), ("POST", "/admin/versions/base/promote", None),
             ("POST", "/admin/rollback", None), ("POST", "/admin/versions/base/retire", None),
             ("POST", "/admin/versions", {"path": str(lora_adapters[0])})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong-token"},
                        {"Authorization": f"Basic {TOKEN}"}):
            response = httpx.request(method, gateway.url + path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert api_error(response)["type"] == "authentication_error"
    assert sum("refused operator call" in r.getMessage() for r in caplog.records) == 15
    assert [r.id for r in gateway.registry().all()] == ["base"]
    ok = httpx.get(gateway.url + "/admin/versions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["current"] == "base"


def test_bad_names_and_transitions(gateway: Gateway, lora_adapters: list[Path]) -> None:
    with gateway.admin() as admin:
        assert refused(lambda: admin.promote("policy-v9")).status == 404
        assert refused(lambda: admin.retire("nope")).code == "version_not_found"
        assert refused(admin.rollback).status == 409
        assert refused(lambda: admin.promote("base")).message == "base is already current"
        assert refused(lambda: admin.retire("base")).status == 409
        v1 = admin.register(lora_adapters[0])["id"]
        admin.promote(v1)
        assert "promote another version first" in refused(lambda: admin.retire(v1)).message
    response = httpx.post(f"{gateway.url}/admin/versions/policy-v9/promote",
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404 and api_error(response)["type"] == "not_found_error"


# --- retirement ---------------------------------------------------------------------------
def test_retire_leaves_serving_and_battles(gateway: Gateway, lora_adapters: list[Path]) -> None:
    with gateway.admin() as admin:
        v1, v2 = (admin.register(path)["id"] for path in lora_adapters)
        result = admin.retire(v1)
        assert (result["before"]["states"], result["after"]["states"]) == (
            {v1: "candidate"}, {v1: "retired"})
        assert refused(lambda: admin.retire(v1)).status == 409
        assert "retired" in refused(lambda: admin.promote(v1)).message
    assert Path(gateway.registry().get(v1).path).is_dir()  # the files stay
    assert set(vllm_adapters(gateway.vllm_url)) == {v2}
    models = {m["id"] for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert models == {"base", v2, "current"}
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="retired"):
        client.chat.completions.create(model=v1, messages=PROMPT, max_tokens=4)
    fought = set()
    with httpx.Client(base_url=gateway.url, timeout=60) as browser:
        for _ in range(6):
            battle = browser.post("/v1/battles", json={"messages": PROMPT, "max_tokens": 4})
            assert battle.status_code == 200, battle.text
            vote = browser.post(f"/v1/battles/{battle.json()['battle_id']}/vote",
                                json={"winner": "tie"})
            fought |= {vote.json()["a_model"], vote.json()["b_model"]}
    assert fought == {"base", v2}


# --- replica sync -------------------------------------------------------------------------
def test_replica_sync_reloads_what_a_replica_lost(gateway: Gateway, lora_adapters: list[Path],
                                                  settings: Settings) -> None:
    # a name held by the server with other weights (an earlier registry's) is replaced
    httpx.post(f"{gateway.vllm_url}/v1/load_lora_adapter",
               json={"lora_name": "policy-v1", "lora_path": str(lora_adapters[1])})
    with gateway.admin() as admin:
        v1 = admin.register(lora_adapters[0])
    assert vllm_adapters(gateway.vllm_url) == {"policy-v1": v1["path"]}
    # as after a replica restart: the adapter is gone; the gateway's sync loads it again
    httpx.post(f"{gateway.vllm_url}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"})
    wait_until(lambda: "policy-v1" in vllm_adapters(gateway.vllm_url), timeout=10)
    # the learner registers without the gateway: the sync loads the new candidate too
    registry = Registry(redis.Redis.from_url(settings.effective_redis_url))
    v2 = register_adapter(settings, registry, lora_adapters[1], metrics={"reward": 1.0})
    wait_until(lambda: vllm_adapters(gateway.vllm_url).get(v2.id) == v2.path, timeout=10)


# --- the CLI ------------------------------------------------------------------------------
def test_cli_operator_commands(gateway: Gateway, lora_adapters: list[Path]) -> None:
    env = {"ARENA_ADMIN_URL": gateway.url, "ARENA_ADMIN_TOKEN": TOKEN, "COLUMNS": "250",
           "ARENA_DATA_DIR": str(gateway.settings.data_dir)}
    runner = CliRunner()

    def arena(*args: str, code: int = 0, token: str = TOKEN) -> str:
        result = runner.invoke(cli_app, list(args), env={**env, "ARENA_ADMIN_TOKEN": token})
        assert result.exit_code == code, result.output
        return result.output

    assert "policy-v1" in arena("register", str(lora_adapters[0]))
    out = arena("promote", "policy-v1")
    assert "current" in out and "base" in out and "policy-v1" in out
    out = arena("versions")
    assert "policy-v1" in out and "current" in out
    assert "policy-v1" in arena("rollback")
    assert "retired" in arena("retire", "policy-v1")
    assert "409" in arena("retire", "policy-v1", code=1)
    assert "401" in arena("versions", code=1, token="wrong")
    assert "not_found" in arena("promote", "policy-v7", code=1)


# --- the current version on merged weights (serve/merged_replica.py) ------------------------
def _merged_requests(url: str) -> float:
    """Answers a merged replica finished (vLLM's /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def _greedy(client: openai.OpenAI) -> tuple[str, list[float]]:
    reply = client.chat.completions.create(model="current", messages=PROMPT, max_tokens=12,
                                           temperature=0, logprobs=True,
                                           extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    return choice.message.content or "", [t.logprob for t in choice.logprobs.content]


def test_current_moves_to_merged_weights_and_back(gateway: Gateway, lora_adapters: list[Path],
                                                  settings: Settings) -> None:
    """One scenario, to start vLLM replicas as few times as possible: the promoted version
    answers the same at temperature 0 on the LoRA path and on its merged replica (both in
    float32, the session server's dtype); a stream running when the merged replica is taken
    away finishes; a merged replica killed under load sends `current` back to the LoRA path
    with no failed request, and the manager starts a new one."""
    from serve.merged_replica import MergedReplicaManager
    from serve.merged_serving import MERGED_KEY, MergedServing

    settings.merged_ports = [free_port(), free_port()]
    settings.vllm_dtype, settings.vllm_kvcache_gib = "float32", 1
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    store = redis.Redis.from_url(settings.effective_redis_url)
    manager = MergedReplicaManager(settings, store)
    try:
        with gateway.admin() as admin:
            v1 = admin.register(lora_adapters[0])["id"]
            admin.promote(v1)
        lora_text, lora_logprobs = _greedy(client)  # no merged replica yet: the LoRA path
        manager.step()  # merge, start the replica, publish it
        merged = MergedServing.from_json(store.get(MERGED_KEY))
        assert merged is not None and merged.version == v1, merged
        served_before = _merged_requests(merged.url)
        merged_text, merged_logprobs = _greedy(client)
        assert _merged_requests(merged.url) == served_before + 1  # it answered, not LoRA
        assert merged_text == lora_text
        assert max(abs(a - b) for a, b in zip(merged_logprobs, lora_logprobs,
                                              strict=True)) < 1e-3
        manager.step()  # current unchanged: nothing to do
        assert MergedServing.from_json(store.get(MERGED_KEY)) == merged

        # A move while answers run: they finish on the replica being drained.
        streams = [iter(client.chat.completions.create(
            model="current", messages=PROMPT, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True})) for _ in range(4)]
        heads = [next(s) for s in streams]  # all four are generating on the merged replica
        replica = manager.active
        assert replica is not None
        manager.replace(None)  # withdrawn: new requests take the LoRA path from now on
        assert store.get(MERGED_KEY) is None
        assert _greedy(client)[0] == lora_text
        for head, stream in zip(heads, streams, strict=True):
            chunks = [head, *stream]
            assert chunks[-1].choices[0].finish_reason == "length"  # all 400 tokens came
            assert {c.model for c in chunks} == {v1}
        wait_until(lambda: not replica.alive(), timeout=60)  # drained, then stopped

        # The merged replica dies under load: no failed request, then a new one is started.
        manager.step()
        merged = MergedServing.from_json(store.get(MERGED_KEY))
        assert merged is not None and merged.version == v1
        with ChatLoad(gateway.url) as load:
            load.wait_for(8)
            served = _merged_requests(merged.url)
            os.killpg(merged.pid, signal.SIGKILL)
            killed = time.monotonic()
            load.wait_for(20, started_after=killed)
        assert load.failures() == [], load.failures()[:3]
        assert served > 0
        manager.step()  # sees the death, starts the version's replica again
        again = MergedServing.from_json(store.get(MERGED_KEY))
        assert again is not None and again.version == v1 and again.pid != merged.pid
        assert _greedy(client)[0] == lora_text
    finally:
        manager.shutdown()
    assert store.get(MERGED_KEY) is None
