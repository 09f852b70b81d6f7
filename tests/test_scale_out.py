"""Scale-out on one machine (issue 15, step 2): `arena up` with a topology of 2 gateways ×
2 vLLM replicas (tiny model) × 2 Celery workers × 2 consumer processes, all on one Redis.

Clients spread chat and votes over both gateways (a load balancer's job in production) and
retry a request on the other gateway when theirs does not answer; the gateways spread
requests over both replicas. A promote loads the version on both replicas before the flip.
One gateway and one replica are killed with SIGKILL under load: no vote answered 2xx (or
found already recorded on retry) is lost or counted twice, chat keeps answering through the
other gateway and replica, and the launcher restarts the killed replica under the load (on
its own share of the cores) and the replica sync gives it the live version back."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from test_launcher import (
    ClientThreads,
    Launcher,
    archive_schema,
    archived_vote_ids,
    child_pid,
    launched,
    processes_of,
    stack_env,
)

from deploy.admin_client import AdminClient
from learner.celery_app import make_celery
from testkit.tiny_model import build_lora_adapter

pytestmark = pytest.mark.slow  # starts two vLLM replicas and the whole stack twice over

UP_TIMEOUT_S = 420  # two vLLM boots in a row on 2 cores
RESTART_TIMEOUT_S = 300
RESYNC_TIMEOUT_S = 30.0  # the replica sync runs every 3 s once the replica answers /health
CHAT = {"model": "current", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BATTLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
RETRY_PAUSE_S = 0.2
RETRIES = 50  # per request, alternating gateways: rides out a gateway restart
ADMIN_TOKEN = "scale-out-token"


@dataclass
class ScaledStack:
    env: dict[str, str]
    launcher: Launcher
    archive_url: str

    @property
    def data_dir(self) -> Path:
        return Path(self.env["ARENA_DATA_DIR"])

    @property
    def gateways(self) -> list[str]:
        first = int(self.env["ARENA_GATEWAY_PORT"])
        return [f"http://127.0.0.1:{first + i}" for i in range(2)]

    @property
    def replicas(self) -> list[str]:
        first = int(self.env["ARENA_VLLM_PORT"])
        return [f"http://127.0.0.1:{first + i}" for i in range(2)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ScaledStack]:
    with archive_schema() as archive_url:
        env = stack_env(
            tmp_path_factory.mktemp("scaled"), tiny_model_dir, gateways=2, replicas=2,
            ARENA_ARCHIVE_URL=archive_url, ARENA_WORKERS="2", ARENA_CONSUMER_PROCESSES="2",
            ARENA_MERGED_CURRENT="false",
            ARENA_RATE_CHAT_PER_SESSION="0", ARENA_RATE_BATTLE_PER_SESSION="0",
            ARENA_RATE_VOTE_PER_SESSION="0", ARENA_LEARN_EVERY_VOTES="1000000000",
            ARENA_STREAM_CLAIM_IDLE_MS="2000", ARENA_RESTART_BACKOFF_S="0.5",
            ARENA_ADMIN_TOKEN=ADMIN_TOKEN, ARENA_IMPORT_ROOTS=f'["{tiny_model_dir.parent}"]',
        )
        with launched(env) as launcher:
            yield ScaledStack(env, launcher, archive_url)


def held_adapters(replica: str) -> set[str]:
    models = httpx.get(f"{replica}/v1/models", timeout=5).json()["data"]
    return {m["id"] for m in models} - {"base"}


def test_up_runs_every_part_of_the_topology(stack: ScaledStack):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    for name in ("vllm", "vllm-2", "gateway", "gateway-2", "worker", "worker-2", "consumers",
                 "consumers-2"):
        stack.launcher.wait_for(f"{name} ready", 1)
        assert (stack.data_dir / "logs" / f"{name}.log").exists()
    for gateway in stack.gateways:
        health = httpx.get(f"{gateway}/healthz", timeout=10).json()
        assert health["vllm"] == dict.fromkeys(stack.replicas, True), health
    from core.settings import Settings

    workers = make_celery(Settings(_env_file=None, redis_url=f"redis://127.0.0.1:"
                                   f"{stack.env['ARENA_REDIS_PORT']}/0")).control.ping(timeout=2)
    names = {name.split("@")[0] for reply in workers for name in reply}
    assert names == {"learner", "learner-2"}, workers


@dataclass
class SpreadLoad(ClientThreads):
    """Two client threads per gateway: one chats, one creates battles and votes. Every request
    goes to the thread's gateway first and, when that does not answer, to the other one;
    cookies are shared (same host), so a battle made on one gateway is voted on the other."""

    gateways: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    chats_ok: int = 0
    chats_failed: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # 2xx, or already recorded on a retry
    refused: list[str] = field(default_factory=list)
    served_by: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=target, args=(i,), daemon=True)
                        for i in range(len(self.gateways)) for target in (self._chat, self._vote)]

    def _send(self, http: httpx.Client, first: int, method: str, path: str,
              **kwargs: object) -> httpx.Response | None:
        """The request on gateway `first`, then the other one, until one answers."""
        for attempt in range(RETRIES):
            gateway = self.gateways[(first + attempt) % len(self.gateways)]
            try:
                return http.request(method, f"{gateway}{path}", **kwargs)
            except httpx.TransportError:
                time.sleep(RETRY_PAUSE_S)
        return None

    def _chat(self, first: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.wait(0.1):
                response = self._send(http, first, "POST", "/v1/chat/completions", json=CHAT)
                if response is not None and response.status_code == 200:
                    self.chats_ok += 1
                    self.served_by.add(response.json()["model"])
                else:
                    self.chats_failed.append("no answer" if response is None else
                                             f"{response.status_code} {response.text[:200]}")

    def _vote(self, first: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.wait(0.1):
                created = self._send(http, first, "POST", "/v1/battles", json=BATTLE)
                if created is None or created.status_code != 200:
                    continue
                battle = created.json()["battle_id"]
                for _ in range(RETRIES):  # 409 "not now" while the answers are written
                    voted = self._send(http, first + 1, "POST", f"/v1/battles/{battle}/vote",
                                       json={"winner": "a"})
                    if voted is None:
                        self.refused.append(f"{battle}: no gateway answered")
                        break
                    code = voted.json().get("error", {}).get("code") if voted.status_code >= 400 \
                        else None
                    if voted.status_code < 300 or code == "already_voted":
                        self.accepted.append(battle)
                        break
                    if voted.status_code != 409:
                        self.refused.append(f"{battle}: {voted.status_code} {voted.text[:200]}")
                        break
                    time.sleep(RETRY_PAUSE_S)

    def wait_for_votes(self, more: int, timeout: float = 60.0) -> None:
        target, deadline = len(self.accepted) + more, time.monotonic() + timeout
        while len(self.accepted) < target:
            assert time.monotonic() < deadline, f"votes stalled at {len(self.accepted)}"
            time.sleep(0.1)


def test_kill_a_gateway_and_a_replica_under_load(stack: ScaledStack, tiny_model_dir: Path):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    launcher = stack.launcher
    adapter = build_lora_adapter(tiny_model_dir, tiny_model_dir.parent / "scale-out-lora", seed=7)
    with AdminClient(stack.gateways[1], ADMIN_TOKEN, actor="test") as admin:
        version = admin.register(adapter)["id"]
        result = admin.promote(version)
    # The promote returned: the version is on both replicas already, before any request.
    assert sorted(result["loaded_on"]) == stack.replicas
    assert all(version in held_adapters(replica) for replica in stack.replicas)

    with SpreadLoad(stack.gateways) as load:
        load.wait_for_votes(10)
        gateway_pid = child_pid(launcher.proc.pid, f"--port {stack.gateways[0].rsplit(':', 1)[1]}")
        replica_pid = child_pid(launcher.proc.pid, f"--port {stack.replicas[1].rsplit(':', 1)[1]}")
        os.kill(gateway_pid, signal.SIGKILL)
        os.kill(replica_pid, signal.SIGKILL)
        launcher.wait_for("gateway exited (exit code -9, SIGKILL)", 30)
        launcher.wait_for("vllm-2 exited (exit code -9, SIGKILL)", 30)
        load.wait_for_votes(10)  # served by the other gateway and replica meanwhile
        launcher.wait_for("gateway restarted", 120)
        load.wait_for_votes(10)
        # The replica restarts under the load (on its own share of the cores) and the
        # replica sync gives it the live version back.
        launcher.wait_for("vllm-2 restarted", RESTART_TIMEOUT_S)
        deadline = time.monotonic() + RESYNC_TIMEOUT_S
        while version not in held_adapters(stack.replicas[1]):  # the replica sync's work
            assert time.monotonic() < deadline, "the restarted replica did not get the version"
            time.sleep(0.5)
        load.wait_for_votes(10)  # with both replicas again
    for gateway in stack.gateways:
        assert httpx.get(f"{gateway}/healthz", timeout=10).json()["vllm"] == dict.fromkeys(
            stack.replicas, True)

    assert load.refused == [] and load.chats_failed == [], (load.refused, load.chats_failed)
    assert load.served_by == {version} and load.chats_ok > 0
    accepted = set(load.accepted)
    assert len(accepted) == len(load.accepted)  # no battle was counted twice by the client
    stored = archived_vote_ids(stack.archive_url, len(accepted))
    assert len(stored) == len(set(stored)) == len(accepted)  # once each ...
    assert set(stored) == accepted  # ... and none lost (a vote's id is its battle's)
    print(f"scale-out: {len(accepted)} votes, {load.chats_ok} chats, 0 failed")


def test_sigterm_stops_the_whole_topology(stack: ScaledStack):
    stack.launcher.wait_for("rlhf-arena is up", UP_TIMEOUT_S)
    stack.launcher.proc.send_signal(signal.SIGTERM)
    stack.launcher.proc.wait(timeout=90)
    assert stack.launcher.proc.returncode == 0
    time.sleep(1)
    assert processes_of(stack.data_dir) == [], "orphans left behind"
