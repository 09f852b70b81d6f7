"""Versioned artefacts: rm-vN / policy-vN folders with manifests, registered as candidates,
written atomically, idempotent per task id; and (4) a worker killed mid-training leaves no
partial checkpoint, and the re-run resumes from its last saved step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.settings import Settings
from deploy import folders
from learner import artifacts
from learner.pipeline import registry_for, run_policy, run_reward_model
from learner.plot import plot_iteration
from learner.presets import get_preset
from learner.prompt_pool import load_shipped_prompts
from learner.sanity import SANITY_PROMPTS
from learner.vote_source import write_jsonl
from testkit.hidden_rule_votes import hidden_rule_votes

pytestmark = pytest.mark.slow  # trains and publishes versions

torch.set_num_threads(1)
PPO_STEPS = 6  # tiny preset checkpoints every 2 steps
KILL_TIMEOUT_S = 120

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from core.settings import Settings
from learner.pipeline import registry_for, run_policy
settings = Settings(_env_file=None)
registry = registry_for(settings)
result = run_policy(settings, sys.argv[1], registry=registry,
                    progress=lambda m: print("STEP", m["step"], flush=True))
print("DONE", result["version"], flush=True)
"""


@pytest.fixture
def learner_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"learner_rollout": "transformers",
                                       "learner_ppo_steps": PPO_STEPS, "learner_nice": 0})


@pytest.fixture
def votes_file(tmp_path: Path) -> Path:
    votes = hidden_rule_votes(120, load_shipped_prompts(), seed=3)
    return write_jsonl(tmp_path / "votes.jsonl", votes)


def _complete_versions(versions: Path) -> list[str]:
    """Every visible folder under the versions dir must be a complete version."""
    visible = [p for p in versions.iterdir() if not p.name.startswith(".")]
    for p in visible:
        assert artifacts.verify(p), f"{p.name} is not a complete version"
    return sorted(p.name for p in visible)


def test_reward_model_artefact_manifest_registry_and_idempotence(
        learner_settings: Settings, votes_file: Path) -> None:
    registry = registry_for(learner_settings)
    registry.ensure_base()
    first = run_reward_model(learner_settings, "task-rm", votes_file, registry=registry)
    assert first["version"] == "rm-v1"
    folder = Path(first["path"])
    manifest = artifacts.read_manifest(folder)
    assert artifacts.verify(folder)
    assert {"adapter_model.safetensors", "adapter_config.json",
            "reward_head.safetensors"} <= set(manifest["files"])
    assert manifest["data_range"]["n_votes"] == 120
    assert manifest["data_range"]["self_pairs"] == 120
    assert manifest["hyperparameters"]["tie_mode"] == "half"
    assert manifest["metrics"]["heldout_accuracy"] is not None
    record = registry.get("rm-v1")
    assert (record.kind, record.state, record.path) == ("reward", "candidate", str(folder))
    assert record.files == manifest["files"]
    # the same task again (a re-delivery): same version, nothing new written
    again = run_reward_model(learner_settings, "task-rm", votes_file, registry=registry)
    assert again["version"] == "rm-v1" and again["resumed"] == "published"
    assert _complete_versions(learner_settings.versions_dir) == ["rm-v1"]


def test_killed_worker_leaves_no_partial_checkpoint_and_resumes(
        learner_settings: Settings, votes_file: Path) -> None:
    settings = learner_settings
    registry = registry_for(settings)
    registry.ensure_base()
    run_reward_model(settings, "task-rm", votes_file, registry=registry)

    # A training process, killed with SIGKILL after its second checkpoint (step 4).
    env = dict(os.environ, ARENA_DATA_DIR=str(settings.data_dir),
               ARENA_REDIS_URL=settings.effective_redis_url,
               ARENA_BASE_MODEL=str(settings.base_model_path), ARENA_LEARNER_PRESET="tiny",
               ARENA_LEARNER_ROLLOUT="transformers", ARENA_LEARNER_PPO_STEPS=str(PPO_STEPS),
               ARENA_LEARNER_NICE="0", ARENA_LEARNER_USER_PROMPTS="0",
               PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, "task-policy"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + KILL_TIMEOUT_S
    for line in child.stdout:
        seen.append(line)
        if line.startswith("STEP 5") or time.monotonic() > deadline:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert any(line.startswith("STEP 5") for line in seen), "".join(seen)[-3000:]

    # Nothing half-written is visible: only the complete reward model; no policy registered.
    assert _complete_versions(settings.versions_dir) == ["rm-v1"]
    assert not [r for r in registry.all() if r.kind == "policy"]
    work = settings.versions_dir / artifacts.WORK_DIR / "task-policy" / "checkpoints"
    checkpoints = [p.name for p in work.iterdir() if not p.name.startswith(".")]
    assert checkpoints == ["step-4"]
    # Simulate a kill during the final publish as well: a stale temp folder of a dead pid.
    stale = settings.versions_dir / f"{folders.TEMP_PREFIX}policy-999999-deadbeef"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    then = time.time() - 2 * folders.NEWBORN_S  # not a folder a writer has just created
    os.utime(stale, (then, then))

    # The re-delivered task (same id) resumes from step 4 and publishes one complete version.
    result = run_policy(settings, "task-policy", registry=registry)
    assert result["metrics"]["resumed_from_step"] == 4
    assert result["version"] == "policy-v1"
    assert not stale.exists()
    assert _complete_versions(settings.versions_dir) == ["policy-v1", "rm-v1"]
    assert not (settings.versions_dir / artifacts.WORK_DIR / "task-policy").exists()
    manifest = artifacts.read_manifest(Path(result["path"]))
    assert [row["step"] for row in manifest["history"]] == list(range(1, PPO_STEPS + 1))
    assert manifest["parent"] == "base" and manifest["rm_version"] == "rm-v1"
    assert {"adapter_model.safetensors", "adapter_config.json",
            "value_head.safetensors"} <= set(manifest["files"])
    assert manifest["hyperparameters"]["kl_coef"] == get_preset("tiny").ppo.kl_coef
    assert manifest["data_range"]["n_votes"] == 120
    record = registry.get("policy-v1")
    assert (record.kind, record.state, record.parent) == ("policy", "candidate", "base")
    adapter_config = json.loads((Path(result["path"]) / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8  # a plain peft adapter vLLM can load

    png = plot_iteration(Path(result["path"]), settings.data_dir / "iteration.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_goes_through_the_adapter_check_and_carries_sanity_figures(
        learner_settings: Settings, votes_file: Path) -> None:
    """A policy the servers would refuse (rank above vllm_max_lora_rank) is neither published
    nor registered, and the run says why; one they accept is registered by the learner with
    the sanity figures of itself and of its parent (the base, then a policy adapter)."""
    settings = learner_settings.model_copy(update={"learner_ppo_steps": 2,
                                                   "vllm_max_lora_rank": 4})
    registry = registry_for(settings)
    registry.ensure_base()
    run_reward_model(settings, "task-rm", votes_file, registry=registry)

    refused = run_policy(settings, "task-refused", registry=registry)
    assert refused["version"] is None and refused["path"] is None
    assert refused["refused"]["code"] == "checkpoint_incompatible"
    assert "rank 8 is above the servers' maximum rank 4" in refused["refused"]["reason"]
    assert not [r for r in registry.all() if r.kind == "policy"]
    assert _complete_versions(settings.versions_dir) == ["rm-v1"]
    assert not (settings.versions_dir / artifacts.WORK_DIR / "task-refused").exists()
    audit = [json.loads(line) for line in
             (settings.data_dir / "audit.log").read_text().splitlines()]
    assert audit[-1]["action"] == "refuse" and audit[-1]["version"] == refused["refused"]["id"]

    settings = settings.model_copy(update={"vllm_max_lora_rank": 16})
    first = run_policy(settings, "task-first", registry=registry)
    record = registry.get(first["version"])
    assert (record.state, record.parent, record.created_by) == ("candidate", "base", "learner")
    sanity = record.metrics["sanity"]
    figures = {"answers", "empty_share", "cut_off_share", "repetition", "mean_length"}
    assert set(sanity) == figures | {"parent"} and set(sanity["parent"]) == figures
    assert sanity["answers"] == sanity["parent"]["answers"] == SANITY_PROMPTS
    assert all(0.0 <= sanity[k] <= 1.0 for k in ("empty_share", "cut_off_share", "repetition"))
    # only the trained adapter is published (the parent's was loaded beside it, then removed)
    assert not [p for p in Path(first["path"]).iterdir() if p.is_dir()]

    # From that policy: its parent's figures are the ones it had itself (same prompts and
    # seeded draws).
    second = run_policy(settings, "task-second", parent=first["version"], registry=registry)
    second_sanity = registry.get(second["version"]).metrics["sanity"]
    assert second_sanity["parent"] == {k: v for k, v in sanity.items() if k != "parent"}
    # ... and the base's, the gate's floor, are the first one's parent's
    assert second_sanity["base"] == sanity["parent"]


class _RunsCode:
    """A pickle that runs code when loaded (writes the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "ran"))


def test_checkpoint_resumes_with_weights_only_and_refuses_a_pickle(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    """The trainer state loads with torch.load(weights_only=True): optimizer, both RNG
    states and the history come back; a trainer_state.pt carrying an arbitrary pickle is
    refused and its code never runs."""
    import pickle
    import random

    from learner.policy_trainer import (
        TRAINER_STATE_FILE,
        PolicyWithValue,
        TrainerState,
        checkpoint_tensors,
        latest_checkpoint,
        load_checkpoint_state,
        load_checkpoint_weights,
        load_policy,
        save_checkpoint,
    )
    from learner.presets import get_preset

    preset = get_preset("tiny").ppo
    model, value_head, _ = load_policy(tiny_model_dir, preset)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.float().pow(2).sum() for p in params).backward()
    optimizer.step()
    rng = random.Random(7)
    rng.random()
    state = TrainerState(4, 0.07, [{"step": 1, "reward": 0.5, "entropy": None}],
                         {"reward": 0.1, "kl": 0.0}, rng.getstate(), torch.get_rng_state(), 2.5)
    trainee = PolicyWithValue(model, value_head)
    folder = save_checkpoint(tmp_path / "checkpoints",
                             checkpoint_tensors(trainee, model, value_head, optimizer), state)
    assert latest_checkpoint(tmp_path / "checkpoints") == folder

    trained = {k: v.clone() for k, v in trainee.state_dict().items()}
    with torch.no_grad():
        for p in params:
            p.zero_()
    load_checkpoint_weights(folder, model, value_head)
    assert all(torch.equal(v, trained[k]) for k, v in trainee.state_dict().items())
    fresh = torch.optim.AdamW(params, lr=1e-3)
    loaded = load_checkpoint_state(folder, trainee, fresh)
    assert (loaded.step, loaded.kl_coef, loaded.history, loaded.eval_start, loaded.seconds) == (
        4, 0.07, state.history, state.eval_start, 2.5)
    assert loaded.python_rng == state.python_rng
    resumed = random.Random()
    resumed.setstate(loaded.python_rng)
    assert resumed.random() == rng.random()
    assert torch.equal(loaded.torch_rng, state.torch_rng)
    for saved, restored in zip(optimizer.state_dict()["state"].values(),
                               fresh.state_dict()["state"].values(), strict=True):
        assert torch.equal(saved["exp_avg"], restored["exp_avg"])

    marker = tmp_path / "pwned"
    torch.save({"optimizer": _RunsCode(marker), "torch_rng": state.torch_rng},
               folder / TRAINER_STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_state(folder, trainee, torch.optim.AdamW(params, lr=1e-3))
    assert not marker.exists()
