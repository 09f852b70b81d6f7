"""One reward-model run and one policy run, as plain functions (the Celery tasks call them;
tests and scripts can too): read votes, train, publish a versioned artefact atomically,
register it in the version registry.

Idempotent under re-delivery (`acks_late`): everything is keyed by the task id. A run that
already published its version (manifest `task_id`) just makes sure it is registered and
returns it; a policy run that was killed resumes from its last checkpoint in
`<versions>/.work/<task id>/`; the vote range (`until`) is fixed at the first attempt and
re-used, so a re-run trains on the same data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from core.settings import Settings
from deploy import folders
from learner import artifacts
from learner.data_parallel import SINGLE, DataParallel
from learner.presets import Preset, get_preset

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
Guard = Callable[[], None]  # raises if this run may no longer write (learner.trigger.LockLost)


class NotEnoughVotes(ValueError):
    """Nothing to train a reward model on yet."""


def bound_resources(settings: Settings) -> None:
    """Training must not starve serving: few torch threads, lower CPU priority (set, not
    added: calling this again changes nothing)."""
    import torch

    torch.set_num_threads(max(1, settings.learner_threads))
    if settings.learner_nice > os.getpriority(os.PRIO_PROCESS, 0):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, settings.learner_nice)
        except OSError as error:
            log.warning("could not renice the learner: %s", error)


def preset_for(settings: Settings) -> Preset:
    preset = get_preset(settings.learner_preset)
    if settings.learner_ppo_steps is not None:
        preset = replace(preset, ppo=replace(preset.ppo, steps=settings.learner_ppo_steps))
    return preset


def registry_for(settings: Settings) -> Any:
    import redis

    from deploy.registry import Registry

    return Registry(redis.Redis.from_url(settings.effective_redis_url),
                    settings.data_dir / "audit.log")


def _register(settings: Settings, registry: Any, record_kwargs: dict[str, Any]) -> None:
    """Register the published version as a candidate; a registry that is down leaves the
    manifest on disk (the version can be registered from it later)."""
    from deploy.decision import LEARNER_ACTOR
    from deploy.registry import VersionRecord
    from deploy.states import TransitionError

    try:
        registry.add(VersionRecord(**record_kwargs), actor=LEARNER_ACTOR)
    except TransitionError:
        pass  # already registered by an earlier attempt of this task
    except Exception as error:  # noqa: BLE001
        log.warning("could not register %s (manifest stays on disk): %s",
                    record_kwargs["id"], error)


def _check_servable(settings: Settings, model: Any, work: Path) -> Any:
    """The checks an operator's adapter passes before it is registered (deploy/adapter_check:
    a LoRA on our base's shapes, rank <= the servers' max), on the trained adapter saved in
    the work dir. None if it passes, else the AdapterRefused."""
    from deploy.adapter_check import AdapterRefused, check_adapter, read_base_shape

    folder = work / "servable-check"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    try:
        check_adapter(folder, read_base_shape(settings.base_model_path),
                      settings.vllm_max_lora_rank)
    except AdapterRefused as error:
        return error
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None


def _refused(registry: Any, version: str, error: Any, result: dict[str, Any]) -> dict[str, Any]:
    """A policy the servers could not load: not published, not registered, reported."""
    log.warning("policy %s refused, not registered (%s): %s", version, error.code, error)
    if registry is not None:
        registry.audit("refuse", version, actor="learner", before=None, after=None,
                       reason=f"{error.code}: {error}")
    return {**result, "version": None,
            "refused": {"id": version, "code": error.code, "reason": str(error)}}


def _next_id(registry: Any, kind: str) -> Callable[[], str] | None:
    if registry is None:
        return None
    return lambda: registry.next_id("policy" if kind == "policy" else "reward")


def _check(guard: Guard | None) -> None:
    if guard is not None:
        guard()


def _work_dir(settings: Settings, task_id: str) -> Path:
    return settings.versions_dir / artifacts.WORK_DIR / task_id


def _task_state(settings: Settings, task_id: str, parallel: DataParallel = SINGLE,
                **defaults: Any) -> dict[str, Any]:
    """Per-task facts fixed at the first attempt (e.g. the vote range), re-used on re-runs;
    data-parallel, written by rank 0 and read by the others."""
    path = _work_dir(settings, task_id) / "task.json"
    if parallel.is_main and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(defaults))
        os.replace(tmp, path)
    parallel.wait()
    return json.loads(path.read_text())


def _already_published(settings: Settings, registry: Any, kind: str, task_id: str,
                       registry_kind: str) -> dict[str, Any] | None:
    folder = artifacts.find_by_task(settings.versions_dir, kind, task_id)
    if folder is None:
        return None
    manifest = artifacts.read_manifest(folder)
    if registry is not None:
        _register(settings, registry, dict(
            id=manifest["id"], kind=registry_kind, state="candidate",
            parent=manifest.get("parent"), path=str(folder), metrics=manifest["metrics"],
            files=manifest["files"]))
    log.info("task %s already published %s", task_id, manifest["id"])
    return {"version": manifest["id"], "path": str(folder), "metrics": manifest["metrics"],
            "resumed": "published"}


# --- reward model ------------------------------------------------------------------------------
def run_reward_model(settings: Settings, task_id: str, votes_jsonl: str | Path | None = None,
                     progress: Progress | None = None, registry: Any = None,
                     guard: Guard | None = None,
                     parallel: DataParallel = SINGLE) -> dict[str, Any]:
    """Train and publish a reward model. Data-parallel (`parallel`): every rank trains, rank
    0 alone publishes and registers; the others return the metrics."""
    from learner.reward_model import save_reward_model, train_reward_model
    from learner.vote_source import data_range, vote_source

    versions = settings.versions_dir
    folders.clean_stale_temp(versions)
    if (done := _already_published(settings, registry, "rm", task_id, "reward")) is not None:
        return done
    preset = preset_for(settings)
    state = _task_state(settings, task_id, parallel, until=time.time())
    source = vote_source(settings, votes_jsonl)
    # Rank 0 reads, every rank gets the same (a database read may differ between two).
    votes = parallel.share(source.votes(until=state["until"]) if parallel.is_main else None)
    if not votes:
        raise NotEnoughVotes(f"no votes in {source.describe()} yet")
    base = settings.learner_reward_base_model or settings.base_model_path
    try:
        result = train_reward_model(votes, base, preset.reward, progress, parallel)
    except ValueError as error:
        raise NotEnoughVotes(str(error)) from error
    if not parallel.is_main:
        return {"version": None, "path": None, "metrics": result.metrics}

    _check(guard)
    version = folders.allocate_id(versions, "rm", _next_id(registry, "rm"))
    final = versions / version
    with folders.atomic_dir(final, kind="rm") as tmp:
        save_reward_model(result.model, tmp)
        manifest = artifacts.write_manifest(tmp, {
            "id": version, "kind": "reward", "task_id": task_id, "base_model": str(base),
            "data_range": data_range(votes, source.describe(), state["until"]),
            "preset": preset.name, "hyperparameters": asdict(preset.reward),
            "metrics": result.metrics, "history": result.history, "created_at": time.time(),
        })
        _check(guard)  # last, before the rename publishes it
    if registry is not None:
        _register(settings, registry, dict(id=version, kind="reward", state="candidate",
                                           parent=None, path=str(final),
                                           metrics=result.metrics, files=manifest["files"]))
    shutil.rmtree(_work_dir(settings, task_id), ignore_errors=True)
    log.info("published %s: held-out accuracy %s", version, result.metrics["heldout_accuracy"])
    return {"version": version, "path": str(final), "metrics": result.metrics}


# --- policy --------------------------------------------------------------------------------------
def _resolve_parent(settings: Settings, registry: Any, parent: str | None
                    ) -> tuple[str, Path | None]:
    """(parent version id, its adapter folder or None for the base)."""
    from deploy.registry import BASE

    if parent is None:
        parent = registry.current() if registry is not None else BASE
    if parent == BASE:
        return BASE, None
    if registry is not None:
        record = registry.get(parent)
        if record.kind == "base" or record.path is None:
            return parent, None
        return parent, Path(record.path)
    return parent, settings.versions_dir / parent


def _resolve_rm(settings: Settings, rm_version: str | None) -> Path:
    if rm_version is not None:
        folder = settings.versions_dir / rm_version
        if not artifacts.verify(folder):
            raise FileNotFoundError(f"reward model {rm_version} is missing or incomplete")
        return folder
    found = artifacts.list_versions(settings.versions_dir, "rm")
    if not found:
        raise FileNotFoundError("no reward model yet: train one first (learner.tasks."
                                "train_reward_model)")
    return found[-1]


def make_rollout_factory(settings: Settings, preset: Preset, work_dir: Path,
                         run_id: str) -> Callable[[Any], Any]:
    from learner.precision import pick_device
    from learner.rollout import TransformersRollout, VLLMRollout

    url = settings.learner_vllm_url or settings.effective_vllm_urls[0]
    # "auto": vLLM where it is the fast sampler, i.e. on a GPU. On a CPU, vLLM with a LoRA
    # adapter was measured at 55-60 tokens/s (SmolLM2, 2 cores) against 100-120 for the
    # transformers backend's merged bf16 copy, and it would share cores with serving.
    use_vllm = settings.learner_rollout == "vllm" or (
        settings.learner_rollout == "auto" and pick_device().type == "cuda"
        and VLLMRollout.available(url))
    ppo = preset.ppo

    def factory(tokenizer: Any) -> Any:
        if use_vllm:
            log.info("PPO rollouts on vLLM at %s", url)
            return VLLMRollout(url, work_dir / "rollout-adapters", tokenizer.eos_token_id,
                               ppo.max_new_tokens, ppo.temperature, run_id=run_id[:8],
                               tokenizer=tokenizer)
        log.info("PPO rollouts with transformers generate")
        return TransformersRollout(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                   ppo.max_new_tokens, ppo.temperature, ppo.precision)

    return factory


def run_policy(settings: Settings, task_id: str, rm_version: str | None = None,
               parent: str | None = None, votes_jsonl: str | Path | None = None,
               progress: Progress | None = None, registry: Any = None,
               rollout_factory: Callable[[Any], Any] | None = None,
               guard: Guard | None = None,
               parallel: DataParallel = SINGLE) -> dict[str, Any]:
    """Train and publish a policy (PPO). Data-parallel (`parallel`): every rank trains, rank
    0 alone checks, publishes and registers; the others return the metrics."""
    from learner.policy_trainer import save_adapter, train_policy
    from learner.prompt_pool import PromptPool, user_prompts_from_archive
    from learner.reward_model import load_reward_model
    from learner.sanity import policy_sanity
    from learner.sequences import encode_answer, encode_prompt
    from learner.vote_source import vote_source

    versions = settings.versions_dir
    folders.clean_stale_temp(versions)
    if (done := _already_published(settings, registry, "policy", task_id, "policy")) is not None:
        return done
    preset = preset_for(settings)
    work = _work_dir(settings, task_id)
    folders.clean_stale_temp(work / "checkpoints")
    state = _task_state(settings, task_id, parallel, until=time.time())

    # The reward model, the parent policy and the prompts: read by rank 0 and shared, so
    # that every rank trains on the same (the registry and the archive may change between
    # two reads, and only rank 0 has the registry).
    rm_dir = Path(parallel.share(str(_resolve_rm(settings, rm_version)) if parallel.is_main
                                 else None))
    rm_manifest = artifacts.read_manifest(rm_dir)
    reward_model, _ = load_reward_model(rm_dir, Path(rm_manifest["base_model"]),
                                        preset.ppo.precision)
    parent_id, parent_path = parallel.share(_resolve_parent(settings, registry, parent)
                                            if parallel.is_main else None)
    pool = PromptPool(user=parallel.share(
        user_prompts_from_archive(settings, settings.learner_user_prompts)
        if parallel.is_main else None))
    ptx_texts = None
    if preset.ppo.ptx_coef > 0:  # reference texts: the conversations with the preferred answer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(settings.base_model_path)
        ptx_texts = [encode_prompt(tokenizer, v.conversation_a if v.winner == "a"
                                   else v.conversation_b, preset.ppo.max_prompt_tokens)
                     + encode_answer(tokenizer, v.answer_a if v.winner == "a" else v.answer_b,
                                     preset.ppo.max_new_tokens)
                     for v in parallel.share(vote_source(settings, votes_jsonl).votes(
                         until=state["until"]) if parallel.is_main else None)
                     if v.winner in ("a", "b")]

    factory = rollout_factory or make_rollout_factory(settings, preset, work, task_id)
    # The adaptive β goes on from where the parent's PPO run left it (one controller over
    # the loop); an operator's adapter or the base has none.
    initial_kl_coef = None
    if preset.ppo.adaptive_kl and parent_path is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            initial_kl_coef = float(artifacts.read_manifest(parent_path)["metrics"]
                                    ["kl_coef_final"])
    dense = preset.ppo.dense_reward and reward_model.token_head is not None
    reward_fn = reward_model.score_tokens if dense else reward_model.score
    result = train_policy(settings.base_model_path, preset.ppo, reward_fn, pool,
                          factory, parent_adapter=parent_path, progress=progress,
                          checkpoint_dir=work / "checkpoints", ptx_texts=ptx_texts,
                          guard=guard, initial_kl_coef=initial_kl_coef, parallel=parallel)
    if not parallel.is_main:
        return {"version": None, "path": None, "metrics": result.metrics}

    version = folders.allocate_id(versions, "policy", _next_id(registry, "policy"))
    final = versions / version
    metrics = {**result.metrics, "rm_heldout_accuracy": rm_manifest["metrics"]["heldout_accuracy"]}
    if (refusal := _check_servable(settings, result.model, work)) is not None:
        shutil.rmtree(work, ignore_errors=True)
        return _refused(registry, version, refusal, {"path": None, "metrics": metrics,
                                                     "parent": parent_id,
                                                     "rm_version": rm_manifest["id"]})
    metrics["sanity"] = policy_sanity(result.model, result.tokenizer, parent_path, preset.ppo)
    _check(guard)
    with folders.atomic_dir(final, kind="policy") as tmp:
        save_adapter(result.model, result.value_head, tmp)
        manifest = artifacts.write_manifest(tmp, {
            "id": version, "kind": "policy", "task_id": task_id, "parent": parent_id,
            "rm_version": rm_manifest["id"], "base_model": str(settings.base_model_path),
            "data_range": {**rm_manifest["data_range"], "prompt_pool": len(pool),
                           "user_prompts": len(pool.user)},
            "preset": preset.name, "hyperparameters": asdict(preset.ppo),
            "metrics": metrics, "history": result.history, "created_at": time.time(),
        })
        _check(guard)  # last, before the rename publishes it
    if registry is not None:
        _register(settings, registry, dict(id=version, kind="policy", state="candidate",
                                           parent=parent_id, path=str(final), metrics=metrics,
                                           files=manifest["files"]))
    shutil.rmtree(work, ignore_errors=True)
    log.info("published %s (parent %s, %s): reward %.3f → %.3f, KL %.2f", version, parent_id,
             rm_manifest["id"], metrics["reward_start"], metrics["reward_end"], metrics["kl_end"])
    return {"version": version, "path": str(final), "metrics": metrics,
            "parent": parent_id, "rm_version": rm_manifest["id"]}
