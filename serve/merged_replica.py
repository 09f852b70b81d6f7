"""Serve the current policy version from merged weights, blue/green (issue 16).

vLLM's CPU build serves a LoRA version at under half the base model's speed, and nearly all chat
goes to `current`. So one process (`arena merged-replica`, started by `arena up`) watches the
`current` alias and, whenever it names a policy version that no merged replica serves yet:

  1. merges the version's adapter into the base (deploy/merge.py, in a child process at a
     lower priority than serving; kept under <data dir>/merged/<version>, so a rollback to it
     needs no second merge);
  2. starts a vLLM replica on that folder, without LoRA, serving the version under its own
     name, on the next of `merged_ports`, while the LoRA replicas keep serving everything;
  3. once it answers, publishes {version, url} (serve/merged_serving.py): the gateway sends that
     version's requests there from its next request on, and to the LoRA path again if it is
     down or no longer serves the version;
  4. drains the replica it replaced (its running answers finish, up to `merged_drain_s`) and
     stops it.

A promotion is therefore as fast as before (the LoRA path serves the new version at once) and
gets base speed once its merged replica is up. When `current` is the base, no merged replica
runs. A merged replica that dies is withdrawn and started again; a manager that restarts adopts
the replica its predecessor published, or stops it. The learner's rollouts never come here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from core.hardware import has_nvidia_gpu
from core.settings import Settings
from core.vllm_server import serving_dtype, vllm_command
from deploy.merge import MergeError, merge_in_child, read_info
from deploy.registry import Registry, VersionRecord
from serve.merged_serving import MERGED_KEY, MergedServing

log = logging.getLogger("arena.merged")

POLL_S = 1.0  # how often `current` is read
DRAIN_GRACE_S = 2.0  # a gateway that read the old record just before the switch still sends
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL
SHUTDOWN_TIMEOUT_S = 5.0  # the same when the manager stops (the launcher waits 8 s for it)
RETRY_AFTER_FAILURE_S = 30.0  # a version whose merge or replica failed is tried again after
MERGE_NICE = 10  # the merge (tens of seconds of CPU) yields the cores to serving
KEEP_MERGED_FOLDERS = 2  # the serving one and the one before it (a rollback's target)
_RUNNING = re.compile(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\}\s+([0-9.eE+-]+)",
                      re.MULTILINE)


@dataclass
class RunningReplica:
    """A vLLM process serving one merged version (its own process group)."""

    version: str
    port: int
    pid: int
    proc: subprocess.Popen | None = None  # None: adopted from a manager that ran before
    started: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def serves(self) -> str | None:
        """The model name the replica answers to, or None if it does not answer."""
        try:
            data = httpx.get(f"{self.url}/v1/models", timeout=2.0).json()["data"]
            return data[0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None

    def busy(self) -> float | None:
        """Answers running or waiting (vLLM's /metrics), or None if it does not answer."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return None
        return sum(float(value) for value in _RUNNING.findall(text))

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.terminate()
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


class MergedReplicaManager:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.registry = Registry(client, settings.data_dir / "audit.log")
        self.folders = settings.data_dir / "merged"
        self.active: RunningReplica | None = None
        self.failed: dict[str, float] = {}  # version -> when its merge or replica last failed
        self.retiring: list[RunningReplica] = []  # replaced, finishing their answers

    # --- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.adopt()
        try:
            while not stop.is_set():
                try:
                    self.step()
                except (redis.RedisError, OSError) as error:
                    log.warning("merged replica: %s; retrying", error)
                stop.wait(POLL_S)
        finally:
            self.shutdown()

    def wanted(self) -> VersionRecord | None:
        """The version a merged replica should serve: `current`, if it is a policy adapter."""
        record = self.registry.get(self.registry.current())
        return record if record.kind == "policy" and record.path else None

    def step(self) -> None:
        """One look: replace a dead replica, follow `current`."""
        if self.active is not None and not self.active.alive():
            log.warning("merged replica of %s (pid %d) died; the LoRA path serves it until a "
                        "new one is up", self.active.version, self.active.pid)
            self.withdraw(self.active)
            self.active = None
        record = self.wanted()
        if record is None:
            if self.active is not None:
                log.info("current is the base model: stopping the merged replica of %s",
                         self.active.version)
                self.replace(None)
            return
        if self.active is not None and self.active.version == record.id:
            return
        if time.time() - self.failed.get(record.id, 0.0) < RETRY_AFTER_FAILURE_S:
            return
        if (port := self.free_port()) is None:
            return  # every port is held by a replica still draining: wait for one
        try:
            folder = self.merged_folder(record)
            replica = self.start(record.id, folder, port)
        except (MergeError, OSError, RuntimeError) as error:
            log.error("could not serve %s from merged weights (%s); it stays on the LoRA path, "
                      "next try in %.0f s", record.id, error, RETRY_AFTER_FAILURE_S)
            self.failed[record.id] = time.time()
            return
        self.replace(replica)
        self.prune_folders()

    # --- the steps --------------------------------------------------------------------------
    def merged_folder(self, record: VersionRecord) -> Path:
        folder = self.folders / record.id
        if read_info(folder) is None:
            log.info("merging %s into full weights …", record.id)
            merge_in_child(self.settings.base_model_path, Path(record.path or ""), folder,
                           record.id, serving_dtype(self.settings.vllm_dtype), MERGE_NICE)
        return folder

    def free_port(self) -> int | None:
        """A port of `merged_ports` no replica of ours holds (serving or draining), or None."""
        taken = {r.port for r in [*self.retiring, *([self.active] if self.active else [])]}
        return next((p for p in self.settings.merged_ports if p not in taken), None)

    def start(self, version: str, folder: Path, port: int) -> RunningReplica:
        """Start a replica on `folder` and wait until it answers (RuntimeError if not)."""
        # Beside the LoRA replicas on the same cores: unpinned (see core/vllm_server.py).
        argv, env = vllm_command(self.settings, folder, port, served_name=version, lora=False,
                                 omp_bind="auto" if has_nvidia_gpu() else "nobind")
        eager = self.settings.merged_enforce_eager
        if eager or (eager is None and not has_nvidia_gpu()):
            argv.append("--enforce-eager")  # no compile warm-up: up in seconds, not minutes
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.settings.logs_dir / f"vllm-merged-{port}.log"
        log.info("starting the merged replica of %s on port %d (log %s) …", version, port,
                 log_path)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        replica = RunningReplica(version, port, proc.pid, proc)
        started = time.monotonic()
        deadline = started + self.settings.vllm_start_timeout_s
        while not replica.healthy():
            if not replica.alive() or time.monotonic() > deadline:
                replica.stop()
                raise RuntimeError(f"the merged replica of {version} did not start (log "
                                   f"{log_path})")
            time.sleep(0.5)
        log.info("merged replica of %s ready in %.1f s", version, time.monotonic() - started)
        return replica

    def replace(self, new: RunningReplica | None) -> None:
        """Publish `new` (None: withdraw), then drain and stop the replica it replaces."""
        old, self.active = self.active, new
        if new is not None:
            record = MergedServing(new.version, new.url, new.pid, time.time())
            self.redis.set(MERGED_KEY, record.to_json())
            log.info("%s is now served from merged weights at %s", new.version, new.url)
        elif old is not None:
            self.withdraw(old)
        if old is not None:
            self.retiring.append(old)
            threading.Thread(target=self.drain_and_stop, args=(old,), name=f"drain-{old.port}",
                             daemon=True).start()

    def withdraw(self, replica: RunningReplica) -> None:
        """Remove the published record if it still names `replica`."""
        current = MergedServing.from_json(self.redis.get(MERGED_KEY))
        if current is not None and current.pid == replica.pid:
            self.redis.delete(MERGED_KEY)

    def drain_and_stop(self, replica: RunningReplica) -> None:
        """Let the replica's running answers finish (new ones go elsewhere now), then stop it."""
        time.sleep(DRAIN_GRACE_S)
        deadline = time.monotonic() + self.settings.merged_drain_s
        while time.monotonic() < deadline:
            busy = replica.busy()
            if not busy:  # 0, or the replica does not answer
                break
            time.sleep(0.5)
        else:
            log.warning("merged replica of %s still busy after %.0f s: stopping it anyway",
                        replica.version, self.settings.merged_drain_s)
        replica.stop()
        with contextlib.suppress(ValueError):
            self.retiring.remove(replica)
        log.info("stopped the merged replica of %s (port %d)", replica.version, replica.port)

    def prune_folders(self) -> None:
        """Keep the newest merged folders (the serving one among them), delete the rest."""
        if not self.folders.is_dir():
            return
        folders = sorted((f for f in self.folders.iterdir() if f.is_dir()),
                         key=lambda f: f.stat().st_mtime, reverse=True)
        keep = {f.name for f in folders[:KEEP_MERGED_FOLDERS]}
        if self.active is not None:
            keep.add(self.active.version)
        for folder in folders:
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def adopt(self) -> None:
        """A replica published by a manager that ran before this one: keep it if it still
        serves its version, else stop it and withdraw it."""
        published = MergedServing.from_json(self.redis.get(MERGED_KEY))
        if published is None:
            return
        port = int(published.url.rsplit(":", 1)[1])
        replica = RunningReplica(published.version, port, published.pid)
        if replica.alive() and replica.serves() == published.version:
            log.info("adopted the merged replica of %s (pid %d)", replica.version, replica.pid)
            self.active = replica
            return
        self.redis.delete(MERGED_KEY)
        if replica.alive():
            replica.stop()

    def shutdown(self) -> None:
        """Stop (the whole stack is going down): withdraw, stop every replica of ours at once,
        draining or not, within SHUTDOWN_TIMEOUT_S."""
        replicas = [*self.retiring, *([self.active] if self.active is not None else [])]
        if self.active is not None:
            with contextlib.suppress(redis.RedisError):
                self.withdraw(self.active)
            self.active = None
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.stop(SHUTDOWN_TIMEOUT_S)


def run_merged_replica(settings: Settings, stop: threading.Event | None = None) -> None:
    """`arena merged-replica`: the manager until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    client = redis.Redis.from_url(settings.effective_redis_url)
    MergedReplicaManager(settings, client).run(stop)
