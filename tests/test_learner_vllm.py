"""PPO rollouts on a real vLLM server (tiny model): every policy update is loaded under a
fresh adapter name, the previous name unloaded; answers come back as token ids."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import torch

from learner.policy_trainer import load_policy, policy_forward, reference_logprobs, train_policy
from learner.presets import get_preset
from learner.prompt_pool import PromptPool
from learner.rollout import VLLMRollout
from learner.sequences import PackedBatch, encode_prompt, pack

torch.set_num_threads(1)
TINY = get_preset("tiny")


def _served(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def test_vllm_rollout_loads_fresh_names_and_unloads_old(vllm_server, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    model, _value_head, tok = load_policy(tiny_model_dir, TINY.ppo)
    rollout = VLLMRollout(vllm_server.url, tmp_path / "adapters", tok.eos_token_id,
                          max_new_tokens=8, temperature=1.0, run_id="t", tokenizer=tok)
    rollout.sync(model, 0)
    first = rollout.current
    assert first in _served(vllm_server.url)
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], 96)
               for p in ("Hi!", "What is 2+2?", "Tell me a joke.")]
    answers = rollout.generate(model, prompts, seed=7)
    assert len(answers) == 3
    for ids in answers:
        assert 1 <= len(ids) <= 9 and all(isinstance(t, int) and 0 <= t < len(tok) for t in ids)
        assert tok.eos_token_id not in ids[:-1]
    assert rollout.generate(model, prompts, seed=7) == answers  # seeded: reproducible

    with torch.no_grad():  # an update: new weights, so a new name
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rollout.sync(model, 1)
    second = rollout.current
    served = _served(vllm_server.url)
    assert second != first and second in served and first not in served
    assert not (tmp_path / "adapters" / first).exists()
    # vLLM samples with the new weights: its log-probs match the trained model's, not the base's
    response = httpx.post(f"{vllm_server.url}/v1/completions", timeout=30, json={
        "model": second, "prompt": prompts[0], "max_tokens": 8, "temperature": 1.0, "seed": 3,
        "logprobs": 1, "return_token_ids": True, "skip_special_tokens": False}).json()
    choice = response["choices"][0]
    batch = pack([prompts[0]], [choice["token_ids"]], tok.pad_token_id)
    served_lp = torch.tensor(choice["logprobs"]["token_logprobs"])
    policy_lp, _, _ = policy_forward(model, None, batch, 1.0)
    base_lp = reference_logprobs(model, batch, 1.0)
    to_policy = (served_lp - policy_lp[0]).abs().mean().item()
    to_base = (served_lp - base_lp[0]).abs().mean().item()
    assert to_policy < 0.05 and to_policy < to_base / 2, (to_policy, to_base)
    rollout.close()
    assert not {first, second} & _served(vllm_server.url)


def test_ppo_with_vllm_rollouts(vllm_server, tiny_model_dir: Path, tmp_path: Path) -> None:
    preset = replace(TINY.ppo, steps=2, rollout_batch=8, minibatch_size=4, eval_prompts=4,
                     max_new_tokens=8)

    def length_reward(batch: PackedBatch) -> torch.Tensor:  # any scalar reward will do here
        return batch.response_lengths.float() / 8

    before = _served(vllm_server.url)
    result = train_policy(
        tiny_model_dir, preset, length_reward, PromptPool(),
        lambda tok: VLLMRollout(vllm_server.url, tmp_path / "adapters", tok.eos_token_id,
                                preset.max_new_tokens, preset.temperature, tokenizer=tok))
    assert result.metrics["rollout_backend"] == "vllm"
    assert [row["step"] for row in result.history] == [1, 2]
    assert all(row["kl"] == row["kl"] for row in result.history)  # no NaN
    assert _served(vllm_server.url) == before  # every learner adapter unloaded at the end


def test_auto_rollout_backend_is_vllm_on_gpu_only(vllm_server, settings, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:
    """`auto` samples on vLLM only where it is the fast sampler (a GPU); `vllm` forces it."""
    from transformers import AutoTokenizer

    from learner.pipeline import make_rollout_factory

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chosen = {}
    for mode in ("auto", "vllm"):
        configured = settings.model_copy(update={"vllm_urls": [vllm_server.url],
                                                 "learner_rollout": mode})
        factory = make_rollout_factory(configured, TINY, tmp_path / mode, "run-" + mode)
        backend = factory(tokenizer)
        chosen[mode] = backend.name
        backend.close()
    assert chosen == {"auto": "vllm" if torch.cuda.is_available() else "transformers",
                      "vllm": "vllm"}
