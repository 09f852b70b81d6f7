"""The version store and its checks, on real files and the real Redis (no model server):
registering copies atomically with a manifest; corrupt, missing or incompatible adapters are
refused and leave nothing behind (the loop's decision rule: tests/test_deploy_decision.py)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from core.settings import Settings
from deploy.adapter_check import AdapterRefused
from deploy.folders import NEWBORN_S, TEMP_PREFIX, clean_stale_temp
from deploy.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    hash_folder,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from deploy.registry import PREVIOUS_KEY, Registry, VersionRecord
from deploy.states import TransitionError
from deploy.store import register_adapter, register_reward_model
from testkit.tiny_model import build_lora_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def registry(settings: Settings) -> Registry:
    reg = Registry(redis.Redis.from_url(settings.effective_redis_url),
                   settings.data_dir / "audit.log")
    reg.ensure_base()
    return reg


def copy_adapter(src: Path, dst: Path, with_manifest: bool = False) -> Path:
    shutil.copytree(src, dst)
    if with_manifest:
        write_manifest(dst, Manifest(files=hash_folder(dst), parent="base",
                                     metrics={"reward": 0.25}, extra={"trainer": "trl"}))
    return dst


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def store_entries(settings: Settings) -> list[str]:
    root = settings.versions_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_refused(settings: Settings, registry: Registry, src: Path, code: str,
                   *words: str) -> None:
    with pytest.raises(AdapterRefused) as info:
        register_adapter(settings, registry, src, actor="test")
    assert info.value.code == code, str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert [r.id for r in registry.all()] == ["base"]
    assert registry.current() == "base"
    assert store_entries(settings) == []  # no version folder, no staging folder left


# --- manifests ------------------------------------------------------------------------------
def test_manifest_round_trip_and_verify(tmp_path: Path, lora_adapters: list[Path]) -> None:
    folder = copy_adapter(lora_adapters[0], tmp_path / "a", with_manifest=True)
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.extra == {"trainer": "trl"}
    assert manifest.files[WEIGHTS] == sha256_file(folder / WEIGHTS)
    assert MANIFEST_NAME not in manifest.files
    verify(folder, manifest)
    flip_byte(folder / WEIGHTS)
    with pytest.raises(ManifestError, match="does not match its sha256"):
        verify(folder, manifest)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ManifestError, match="adapter_config.json is missing"):
        verify(folder, manifest)


def test_manifest_refuses_paths_outside_its_folder(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"files": {"../x": "00"}}))
    with pytest.raises(ManifestError, match="outside its folder"):
        read_manifest(tmp_path)


# --- registering ----------------------------------------------------------------------------
def test_register_copies_into_store_with_manifest(settings: Settings, registry: Registry,
                                                  lora_adapters: list[Path]) -> None:
    record = register_adapter(settings, registry, lora_adapters[0], metrics={"kl": 0.1},
                              actor="learner")
    assert (record.id, record.kind, record.state, record.parent) == (
        "policy-v1", "policy", "candidate", "base")
    folder = Path(record.path)
    assert folder == (settings.versions_dir / "policy-v1").resolve()
    assert store_entries(settings) == ["policy-v1"]
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.metrics == {"kl": 0.1}
    assert manifest.files == record.files == hash_folder(folder)
    assert record.files[WEIGHTS] == sha256_file(lora_adapters[0] / WEIGHTS)
    assert registry.get("policy-v1") == record
    audit = [json.loads(line) for line in (settings.data_dir / "audit.log").read_text()
             .splitlines()]
    assert audit[-1]["action"] == "register" and audit[-1]["version"] == "policy-v1"
    assert audit[-1]["actor"] == "learner"

    second = register_adapter(settings, registry, lora_adapters[1])
    assert second.id == "policy-v2" and registry.current() == "base"


def _backdate(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(folder, (then, then))


def test_register_removes_what_a_killed_writer_left_on_this_host_only(
        settings: Settings, registry: Registry, lora_adapters: list[Path]) -> None:
    """Staging and the learner write through deploy/folders.py: a temp folder of a dead
    process on this host is removed at the next registration; one of a live process, or of
    another host sharing the store (its pid means nothing here), or one just created (its
    writer may not hold its lock yet), is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    root = settings.versions_dir
    left = {name: root / f"{TEMP_PREFIX}{name}" for name in (
        f"stage-{host}-{dead.pid}-0a0a0a0a",  # this host, process gone: removed
        f"rm-{host}-{os.getpid()}-0b0b0b0b",  # this host, this (live) process: kept
        f"stage-other_host-{dead.pid}-0c0c0c0c",  # another host's: kept
        f"stage-{host}-{dead.pid}-0d0d0d0d")}  # process gone, but newborn: kept
    for name, folder in left.items():
        folder.mkdir(parents=True)
        (folder / "half-written").write_text("x")
        if not name.endswith("0d0d0d0d"):
            _backdate(folder, 2 * NEWBORN_S)
    record = register_adapter(settings, registry, lora_adapters[0])
    assert store_entries(settings) == sorted(
        [record.id, *(folder.name for name, folder in left.items() if "0a0a0a0a" not in name)])


# A writer that creates a temp folder, says where, and keeps writing it.
WRITER = """import sys, time
from pathlib import Path
from deploy.folders import temp_dir
with temp_dir(Path(sys.argv[1]), "stage") as temp:
    print(temp, flush=True)
    time.sleep(120)
"""


def test_a_live_writer_keeps_its_temp_folder_whatever_pid_its_name_shows(tmp_path: Path) -> None:
    """Two containers that share a hostname and the store but not a pid namespace: a live
    writer's folder can name a pid that is dead here. The writer's lock keeps the folder; once
    the writer is killed (-9) the kernel drops the lock and the next clean removes it."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert writer.stdout is not None
        temp = Path(writer.stdout.readline().strip())
        dead = subprocess.Popen(["true"])
        dead.wait()
        kind, host, _pid, random = temp.name[len(TEMP_PREFIX):].split("-")
        seen_from_elsewhere = temp.with_name(f"{TEMP_PREFIX}{kind}-{host}-{dead.pid}-{random}")
        temp.rename(seen_from_elsewhere)  # the lock is the folder's, not its name's
        _backdate(seen_from_elsewhere, 2 * NEWBORN_S)
        assert clean_stale_temp(tmp_path) == [] and seen_from_elsewhere.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert clean_stale_temp(tmp_path) == [seen_from_elsewhere]
    assert not seen_from_elsewhere.exists()


def test_register_keeps_the_source_manifest(settings: Settings, registry: Registry,
                                            lora_adapters: list[Path], tmp_path: Path) -> None:
    src = copy_adapter(lora_adapters[0], tmp_path / "trained", with_manifest=True)
    (src / "notes.txt").write_text("not in the manifest: not copied")
    record = register_adapter(settings, registry, src)
    assert record.metrics == {"reward": 0.25}
    manifest = read_manifest(Path(record.path))
    assert manifest is not None and manifest.extra["trainer"] == "trl"
    assert not (Path(record.path) / "notes.txt").exists()


def test_refuses_a_flipped_byte(settings: Settings, registry: Registry,
                                lora_adapters: list[Path], tmp_path: Path) -> None:
    src = copy_adapter(lora_adapters[0], tmp_path / "corrupt", with_manifest=True)
    flip_byte(src / WEIGHTS)
    assert_refused(settings, registry, src, "checkpoint_corrupt", WEIGHTS, "sha256")


def test_refuses_missing_files(settings: Settings, registry: Registry,
                               lora_adapters: list[Path], tmp_path: Path) -> None:
    listed = copy_adapter(lora_adapters[0], tmp_path / "listed", with_manifest=True)
    (listed / WEIGHTS).unlink()
    assert_refused(settings, registry, listed, "checkpoint_missing", WEIGHTS)
    bare = copy_adapter(lora_adapters[0], tmp_path / "bare")
    (bare / WEIGHTS).unlink()
    assert_refused(settings, registry, bare, "checkpoint_missing", WEIGHTS)
    assert_refused(settings, registry, tmp_path / "nowhere", "checkpoint_missing",
                   "not a folder")


def test_refuses_a_truncated_file(settings: Settings, registry: Registry,
                                  lora_adapters: list[Path], tmp_path: Path) -> None:
    src = copy_adapter(lora_adapters[0], tmp_path / "cut")
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[:-64])
    assert_refused(settings, registry, src, "checkpoint_corrupt", "truncated")


def test_refuses_rank_above_the_servers_maximum(settings: Settings, registry: Registry,
                                                tiny_model_dir: Path, tmp_path: Path) -> None:
    src = build_lora_adapter(tiny_model_dir, tmp_path / "r64", seed=3, rank=64)
    assert settings.vllm_max_lora_rank == 16
    assert_refused(settings, registry, src, "checkpoint_incompatible", "rank 64", "16")


def test_refuses_an_adapter_for_another_base(settings: Settings, registry: Registry,
                                             tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128,
                                 num_hidden_layers=3, num_attention_heads=3,
                                 num_key_value_heads=3, head_dim=32)).save_pretrained(other)
    src = build_lora_adapter(other, tmp_path / "other-lora", seed=4)
    # adapter_config.json names a base folder we can read: its shape is compared first
    assert_refused(settings, registry, src, "checkpoint_incompatible", "hidden size 96",
                   "hidden size 64")
    # trained elsewhere (a hub id we cannot read): the tensor shapes give it away
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    (src / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(settings, registry, src, "checkpoint_incompatible", "different base",
                   "shape")


def test_register_reward_model(settings: Settings, registry: Registry,
                               lora_adapters: list[Path]) -> None:
    record = register_reward_model(settings, registry, lora_adapters[0], metrics={"acc": 0.7})
    assert (record.id, record.kind, record.state) == ("rm-v1", "reward", "candidate")
    assert [r.id for r in registry.policies()] == ["base"]


# --- rollback: one atomic, checked flip -----------------------------------------------------
def _three_promoted(registry: Registry) -> None:
    """policy-v1..v3 promoted in turn: current policy-v3, history [v2, v1, base]."""
    for version in ("policy-v1", "policy-v2", "policy-v3"):
        registry.add(VersionRecord(id=version, kind="policy", state="candidate", parent="base"))
        registry.promote(version, actor="test")


def test_rollback_refuses_a_target_or_current_that_changed(registry: Registry) -> None:
    _three_promoted(registry)
    before = registry.redis.lrange(PREVIOUS_KEY, 0, -1)
    with pytest.raises(TransitionError, match="current changed"):
        registry.rollback("test", expected_current="policy-v2")
    with pytest.raises(TransitionError, match="target changed"):
        registry.rollback("test", expected_target="policy-v1")
    assert registry.current() == "policy-v3"
    assert registry.redis.lrange(PREVIOUS_KEY, 0, -1) == before
    assert registry.rollback("test", expected_current="policy-v3",
                             expected_target="policy-v2") == ("policy-v3", "policy-v2")


def _run_concurrently(monkeypatch: pytest.MonkeyPatch, *make: Any,
                      first: int | None = None) -> tuple[list[Any], list[str]]:
    """Run the swap coroutines together; each one's replica load waits until all started, so
    every one reads its target before any flips. With `first`, that coroutine is let through
    and finishes before the others are (a fixed order for a race whose outcome depends on
    it). Returns (results or errors, loaded ids)."""
    from serve import replicas

    loaded: list[str] = []

    async def main() -> list[Any]:
        gates = [asyncio.Event() for _ in make]
        whose_load: contextvars.ContextVar[int] = contextvars.ContextVar("whose_load")

        async def slow_load(pool: Any, record: VersionRecord,
                            require_one: bool = True) -> list[str]:
            loaded.append(record.id)
            await gates[whose_load.get()].wait()
            return ["http://replica"]

        monkeypatch.setattr(replicas, "load_everywhere", slow_load)
        tasks = []
        for i, m in enumerate(make):
            whose_load.set(i)  # each task copies the context as it is when created
            tasks.append(asyncio.create_task(m(replicas)))
        while len(loaded) < len(make):
            await asyncio.sleep(0.01)
        if first is not None:
            gates[first].set()
            await asyncio.wait([tasks[first]])
        for gate in gates:
            gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main()), loaded


def test_two_concurrent_rollbacks_flip_once(registry: Registry,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _three_promoted(registry)
    results, loaded = _run_concurrently(
        monkeypatch, lambda hs: hs.rollback(None, registry, "a"),
        lambda hs: hs.rollback(None, registry, "b"))
    assert loaded == ["policy-v2", "policy-v2"]
    done = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert [(r.before["current"], r.id) for r in done] == [("policy-v3", "policy-v2")]
    assert len(refused) == 1 and isinstance(refused[0], TransitionError), refused
    # The second one never went on to policy-v1, which no replica was asked to load.
    assert registry.current() == "policy-v2"
    assert registry.get("policy-v3").state == "candidate"
    assert registry.rollback_target() == "policy-v1"


def test_promote_during_a_rollback_wins_and_the_rollback_changes_nothing(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    _three_promoted(registry)
    results, loaded = _run_concurrently(
        monkeypatch, lambda hs: hs.rollback(None, registry, "a"),
        lambda hs: hs.promote(None, registry, "policy-v1", "b"), first=1)
    rolled, promoted = results
    assert sorted(loaded) == ["policy-v1", "policy-v2"]
    assert isinstance(rolled, TransitionError) and "current changed" in str(rolled)
    assert promoted.id == "policy-v1" and registry.current() == "policy-v1"
    assert registry.get("policy-v2").state == "candidate"


# --- where a checkpoint may come from -------------------------------------------------------
def test_register_only_from_an_import_root_after_symlinks(settings: Settings,
                                                          lora_adapters: list[Path],
                                                          tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    strict = settings.model_copy(update={"import_roots": [imports]})
    registry = Registry(redis.Redis.from_url(strict.effective_redis_url))
    registry.ensure_base()
    outside = copy_adapter(lora_adapters[0], tmp_path / "elsewhere")
    (imports / "link").symlink_to(outside, target_is_directory=True)
    leaky = copy_adapter(lora_adapters[0], imports / "leaky")
    (leaky / "adapter_model.safetensors").unlink()
    (leaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")

    for src, words in ((outside, "outside the import roots"),
                       (imports / "link", "outside the import roots"),  # followed, then checked
                       (imports / "link" / ".." / ".." / "elsewhere", "outside the import roots"),
                       (tmp_path / "nowhere", "ARENA_IMPORT_ROOTS"),  # refused before looking
                       (leaky, "outside the checkpoint folder")):
        assert_refused(strict, registry, src, "path_not_allowed", words)

    inside = copy_adapter(lora_adapters[0], imports / "good")
    assert register_adapter(strict, registry, inside).id == "policy-v1"
    # The learner's own versions folder always counts (a version registered again from it).
    again = copy_adapter(lora_adapters[1], strict.versions_dir / "exported")
    assert register_adapter(strict, registry, again).id == "policy-v2"
