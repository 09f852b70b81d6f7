"""Real-server fixtures every test uses: a tiny random model with the real SmolLM2 tokenizer,
a vLLM server on it with LoRA enabled, our own Redis (AOF) on a free port, PostgreSQL, and a
real Celery worker. Nothing is mocked; what is slow to start is session-scoped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from arena.redis_server import start_redis
from core.settings import Settings
from core.vllm_server import vllm_command
from testkit.net import free_port
from testkit.processes import start_worker, stop_group
from testkit.tiny_model import build_lora_adapter, build_tiny_model

POSTGRES_URL = os.environ.get(
    "ARENA_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
TINY_MAX_MODEL_LEN = 512
VLLM_START_TIMEOUT_S = 240
# The fast tier, `pytest -m "not slow"`: what starts no model server, worker, browser or
# training run. A test that uses one of these fixtures is slow without saying so.
SLOW_FIXTURES = {"vllm_server", "sft_vllm_server", "sft_model_dir", "celery_worker", "gateway",
                 "gateway_settings", "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- models -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def lora_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two random LoRA adapters on the tiny model: the policy versions of the tests."""
    root = tmp_path_factory.mktemp("adapters")
    return [build_lora_adapter(tiny_model_dir, root / f"lora{i}", seed=i) for i in (1, 2)]


@pytest.fixture(scope="session")
def sft_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a quick supervised fine-tune (testkit.hidden_rule_votes.sft_tiny_base,
    ~10 s): it writes short word sequences, a fifth of them with " banana", so a policy
    trained on it has something to learn (the random tiny model's outputs are too flat)."""
    from learner.prompt_pool import load_shipped_prompts
    from testkit.hidden_rule_votes import sft_tiny_base

    return sft_tiny_base(tiny_model_dir, tmp_path_factory.mktemp("sft") / "tiny-sft",
                         load_shipped_prompts())


# --- Redis --------------------------------------------------------------------------------
class RedisProcess:
    """Our own redis-server with AOF on a free port; restartable for fault-injection tests."""

    def __init__(self, data_dir: Path, appendfsync: str = "always") -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.port, self.data_dir, self.appendfsync)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_group(self.proc, sig)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """A clean database for each test (the session's server, flushed)."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private Redis for tests that kill or restart it."""
    server = RedisProcess(tmp_path / "redis")
    yield server
    server.stop()


# --- PostgreSQL ---------------------------------------------------------------------------
@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the machine's PostgreSQL (database `test`), dropped afterwards."""
    engine = create_engine(POSTGRES_URL)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {error}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


# --- settings -----------------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> Settings:
    """Settings for one test: its own data dir, the session Redis, the tiny model."""
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "var",
        redis_url=redis_url,
        base_model=tiny_model_dir,
        admin_token="test-admin-token",
        session_secret="test-session-secret",
        learner_preset="tiny",
        vllm_max_model_len=TINY_MAX_MODEL_LEN,
        import_roots=[tmp_path.parent],  # the session's temp folders: the test adapters
    )


# --- vLLM ---------------------------------------------------------------------------------
class VLLMProcess:
    def __init__(self, model_dir: Path, log_path: Path, dtype: str = "auto") -> None:
        self.port = free_port()
        base = Settings(_env_file=None, vllm_kvcache_gib=1, vllm_max_model_len=TINY_MAX_MODEL_LEN,
                        vllm_dtype=dtype)
        argv, env = vllm_command(base, model_dir, self.port)
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=log_path.parent)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a server that did not start in time must not run on, orphaned
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM not ready in {VLLM_START_TIMEOUT_S}s")

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    """One real vLLM OpenAI server on the tiny model for the whole session (~20-40 s start), in
    float32: a LoRA version served here and its merged weights then agree (bf16 rounds the two
    paths differently, which flips near-tied greedy tokens of a random model)."""
    server = VLLMProcess(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "vllm.log",
                         dtype="float32")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sft_vllm_server(sft_model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    """A second session vLLM server, on the SFT'd tiny base (the loop's integration test)."""
    server = VLLMProcess(sft_model_dir, tmp_path_factory.mktemp("vllm-sft") / "vllm.log")
    yield server
    server.stop()


# --- Celery -------------------------------------------------------------------------------
@pytest.fixture
def celery_worker(settings: Settings) -> Iterator[subprocess.Popen]:
    """A real Celery worker process on the test's Redis broker and settings."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    proc = start_worker(settings, settings.data_dir / "worker.log",
                        f"test-{uuid.uuid4().hex[:6]}@%h")
    from learner.celery_app import make_celery

    app = make_celery(settings)
    deadline = time.monotonic() + 60
    while not app.control.ping(timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            pytest.fail("Celery worker did not start:\n"
                        + (settings.data_dir / "worker.log").read_text()[-3000:])
    yield proc
    stop_group(proc)


@pytest.fixture(scope="session", autouse=True)
def _clean_vllm_temp_files() -> Iterator[None]:
    """vLLM leaves vllm_dist_* files in the temp folder; remove ours at the end."""
    before = set(Path("/tmp").glob("vllm_dist_*"))
    yield
    for leftover in set(Path("/tmp").glob("vllm_dist_*")) - before:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(
            missing_ok=True)


# --- gateway ------------------------------------------------------------------------------
class GatewayServer:
    """The real gateway app served by uvicorn in a thread, on a free port."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        from serve.app import create_app

        self.settings = settings
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on",
                                proxy_headers=False)  # as `arena up`: the app decides
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def gateway_settings(settings: Settings, vllm_server: VLLMProcess) -> Settings:
    return settings.model_copy(update={"vllm_urls": [vllm_server.url]})


@pytest.fixture
def gateway(gateway_settings: Settings) -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_settings)
    yield server
    server.stop()


@pytest.fixture
def registry(settings: Settings):
    """The version registry on the test's Redis (the gateway's, when a test has both)."""
    from deploy.registry import Registry

    reg = Registry(redis.Redis.from_url(settings.effective_redis_url),
                   settings.data_dir / "audit.log")
    reg.ensure_base()
    return reg


@pytest.fixture
def two_policies(registry, lora_adapters: list[Path]) -> list[str]:
    """Register the two test adapters as candidate versions policy-v1 and policy-v2."""
    from deploy.registry import VersionRecord

    ids = []
    for path in lora_adapters:
        version = registry.next_id("policy")
        registry.add(VersionRecord(id=version, kind="policy", state="candidate", parent="base",
                                   path=str(path)))
        ids.append(version)
    return ids


# --- a model server that misbehaves on demand -------------------------------------------------
class FakeModelServer:
    """A model server that answers GETs (health, models) and, to a POST, either never
    answers (`hang`) or streams without end (`flood`); `closed` is set once the gateway has
    closed a flooded stream."""

    def __init__(self, mode: str) -> None:
        self.mode, self.port = mode, free_port()
        self.posted, self.closed, self.stop = (threading.Event(), threading.Event(),
                                               threading.Event())
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        with self.listener:
            while not self.stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            if request.startswith(b"GET"):
                body = b'{"object": "list", "data": []}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: "
                             b"application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                return
            self.posted.set()
            if self.mode == "hang":
                self.stop.wait()
                return
            # No content-length: the body runs until the connection closes.
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"connection: close\r\n\r\n")
            chunk = b'data: {"choices": [{"delta": {"content": "flood"}}]}\n\n' * 1000
            conn.settimeout(0.1)
            while not self.stop.is_set():
                try:
                    conn.sendall(chunk)
                except TimeoutError:
                    continue  # the gateway is not reading: try again
                except OSError:
                    self.closed.set()
                    return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def fake_model_server(request) -> Iterator[FakeModelServer]:
    server = FakeModelServer(request.param)
    yield server
    server.close()
