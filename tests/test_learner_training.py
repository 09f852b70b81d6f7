"""Reward model and PPO on the tiny model (acceptance criteria 1–3 of the learner issue).

(1) an RM trained on votes from a hidden rule (the preferred answer contains " banana")
    reaches ≥ 0.9 held-out accuracy;
(2) PPO against that RM raises the mean RM reward over the starting policy while the
    measured KL(π ‖ π_ref) stays below its target;
(3) the reference (base) weights are bit-identical before and after training.

The PPO policy starts from a quick supervised fine-tune of the tiny model
(`testkit.hidden_rule_votes.sft_tiny_base`): the random tiny model's logits have a std of ~0.16, so
no LoRA can move its near-uniform distribution over 49k tokens; like InstructGPT, PPO
starts from an SFT model, which is also the reference.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from learner.policy_trainer import (
    policy_forward,
    reference_logprobs,
    save_adapter,
    train_policy,
)
from learner.ppo import AdaptiveKLController
from learner.presets import get_preset
from learner.prompt_pool import PromptPool, load_shipped_prompts
from learner.reward_model import (
    FrozenCache,
    Pair,
    bradley_terry_loss,
    build_reward_model,
    fit_length_weight,
    load_reward_model,
    pair_rewards,
    save_reward_model,
    train_reward_model,
    votes_to_pairs,
)
from learner.rollout import TransformersRollout
from learner.sequences import encode_answer, encode_prompt, pack
from testkit.hidden_rule_votes import MARKER, hidden_rule_votes, random_answer, sft_tiny_base

pytestmark = pytest.mark.slow  # trains reward models and policies

torch.set_num_threads(1)
TINY = get_preset("tiny")
N_VOTES = 300


def _hash_base(named_params) -> str:
    """sha256 over the frozen base weights (LoRA weights excluded, peft's wrapping
    `base_layer.` / `base_model.model.` removed from the names)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(
        (n.replace("base_model.model.", "").replace(".base_layer", ""), t)
        for n, t in named_params if "lora_" not in n
    ):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return load_shipped_prompts()


@pytest.fixture(scope="module")
def votes(prompts: list[str]):
    return hidden_rule_votes(N_VOTES, prompts, seed=1)


@pytest.fixture(scope="module")
def reward(votes, tiny_model_dir: Path):
    return train_reward_model(votes, tiny_model_dir, TINY.reward)


@pytest.fixture(scope="module")
def sft_base(tiny_model_dir: Path, prompts: list[str], tmp_path_factory) -> Path:
    return sft_tiny_base(tiny_model_dir, tmp_path_factory.mktemp("sft") / "tiny-sft", prompts)


@pytest.fixture(scope="module")
def ppo_run(sft_base: Path, reward, prompts: list[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    fresh = AutoModelForCausalLM.from_pretrained(sft_base, dtype=torch.float32)
    before = _hash_base(fresh.named_parameters())
    probe = pack([encode_prompt(tokenizer, [{"role": "user", "content": p}], 96)
                  for p in prompts[:4]],
                 [encode_answer(tokenizer, f"Some answer number {i}.", 16) for i in range(4)],
                 tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = fresh.get_decoder()(input_ids=probe.input_ids,
                                     attention_mask=probe.attention_mask,
                                     position_ids=probe.position_ids).last_hidden_state
        logits = fresh.get_output_embeddings()(hidden[:, probe.prompt_width - 1: -1])
        ref_before = torch.gather(torch.log_softmax(logits / TINY.ppo.temperature, -1), 2,
                                  probe.responses.unsqueeze(-1)).squeeze(-1)
    result = train_policy(
        sft_base, TINY.ppo, reward.model.score, PromptPool(),
        lambda tok: TransformersRollout(tok.eos_token_id, tok.pad_token_id,
                                        TINY.ppo.max_new_tokens, TINY.ppo.temperature))
    return {"result": result, "hash_before": before, "probe": probe, "ref_before": ref_before,
            "hash_on_disk": _hash_base(
                AutoModelForCausalLM.from_pretrained(sft_base).named_parameters())}


# --- (1) reward model ------------------------------------------------------------------------
def test_reward_model_learns_hidden_rule(reward, votes) -> None:
    m = reward.metrics
    assert m["n_heldout"] >= 30
    assert m["heldout_accuracy"] >= 0.9, m
    assert m["heldout_calibration"] < 0.25, m
    # both_bad carries no ranking: skipped; ties are trained toward ½; self-pairs are ordinary
    assert m["pairs"]["both_bad_skipped"] == sum(v.winner == "both_bad" for v in votes)
    assert m["pairs"]["ties"] == sum(v.winner == "tie" for v in votes)
    assert m["pairs"]["self_pairs"] == m["pairs"]["decisive"] + m["pairs"]["ties"]


def test_reward_read_at_last_token_regardless_of_padding(reward, tiny_model_dir: Path) -> None:
    tok = reward.tokenizer
    short_p = encode_prompt(tok, [{"role": "user", "content": "Hi"}], 96)
    long_p = encode_prompt(tok, [{"role": "user", "content": "Tell me a long story " * 5}], 96)
    short_a = encode_answer(tok, "Yes" + MARKER + ".", 32)
    long_a = encode_answer(tok, "A much longer answer with many more words in it.", 32)
    alone = reward.model.score(pack([short_p], [short_a], tok.pad_token_id))
    padded = reward.model.score(pack([short_p, long_p], [short_a, long_a], tok.pad_token_id))
    assert torch.allclose(alone[0], padded[0], atol=1e-4)


def test_rewards_are_normalised_on_training_answers(reward) -> None:
    assert reward.metrics["reward_std"] > 0
    tok = reward.tokenizer
    p = encode_prompt(tok, [{"role": "user", "content": "Tell me a joke."}], 96)
    good = reward.model.score(pack([p], [encode_answer(tok, "Here" + MARKER + " you go.", 32)],
                                   tok.pad_token_id))
    bad = reward.model.score(pack([p], [encode_answer(tok, "Here you go.", 32)],
                                  tok.pad_token_id))
    assert good.item() > 0 > bad.item()  # normalised: the rule splits around the mean
    assert abs(good.item()) < 10 and abs(bad.item()) < 10


def test_dense_scores_sum_to_the_score_and_are_causal(votes, tiny_model_dir: Path) -> None:
    reward = train_reward_model(votes[:64], tiny_model_dir, replace(TINY.reward, epochs=1,
                                                                    token_sum=True))
    tok = reward.tokenizer
    p = encode_prompt(tok, [{"role": "user", "content": "Tell me a joke."}], 96)
    full = encode_answer(tok, "Here" + MARKER + " you go, a joke about cats.", 32)
    batch = pack([p, p], [full, full[:4]], tok.pad_token_id)
    dense = reward.model.score_tokens(batch)
    assert dense.shape == batch.response_mask.shape
    assert torch.allclose(dense.sum(1), reward.model.score(batch), atol=1e-4)
    # token t's term reads tokens <= t only: the prefix's first 3 terms equal the full
    # answer's (its 4th carries the last-token term as well)
    assert torch.allclose(dense[1, :3], dense[0, :3], atol=1e-4)
    assert (dense[1, 4:] == 0).all()  # nothing on padding


def test_frozen_layer_cache_gives_the_full_forward(votes, tiny_model_dir: Path) -> None:
    """LoRA on the top layer only: the bottom layer's cached output, put back into batches of
    other pairs (other padding), gives the rewards and gradients of the whole trunk."""
    preset = replace(TINY.reward, lora_layers=1)
    model, tok = build_reward_model(tiny_model_dir, preset)
    assert model.frozen_layers == len(model._layers()) - 1 > 0
    with torch.no_grad():  # a trained-looking adapter and token head, not the zero init
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    pairs, _ = votes_to_pairs(votes[:12], tok, preset)
    cache = FrozenCache(model, tok.pad_token_id)
    cache.fill(pairs, batch_size=5)  # filled in other batches than the ones read below
    for chunk in (pairs[:4], pairs[3:12]):
        plain = pair_rewards(model, chunk, tok.pad_token_id)
        cached = pair_rewards(model, chunk, tok.pad_token_id, cache)
        assert torch.allclose(plain, cached, atol=1e-5)
    lora = next(p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)
    grads = []
    for use in (None, cache):
        lora.grad = None
        pair_rewards(model, pairs[:6], tok.pad_token_id, use).sum().backward()
        grads.append(lora.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_probe_reward_model_learns_and_round_trips(votes, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:
    """The probe (no LoRA, trunk cut at a readout layer, standardised features, L2 heads)
    learns the hidden rule from the cached features alone, and loads back as it was saved."""
    preset = replace(TINY.reward, lora_layers=0, readout_layer=1, pooling="mean",
                     last_token=False, token_sum=True, head_l2=1e-3, epochs=8, lr=3e-2)
    result = train_reward_model(votes, tiny_model_dir, preset)
    model = result.model
    assert model.is_probe and len(model._layers()) == 1
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert result.metrics["heldout_accuracy"] >= 0.8, result.metrics
    assert (model.feature_std != 1).any()  # standardised on the training answers
    save_reward_model(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()  # nothing but the heads to keep
    loaded, tok = load_reward_model(tmp_path, tiny_model_dir, preset.precision)
    assert loaded.is_probe and loaded.pooling == "mean" and not loaded.last_token
    p = encode_prompt(tok, [{"role": "user", "content": "Tell me a joke."}], 96)
    batch = pack([p, p], [encode_answer(tok, "Here" + MARKER + " you go.", 32),
                          encode_answer(tok, "Here you go, then.", 32)], tok.pad_token_id)
    assert torch.allclose(loaded.score(batch), model.score(batch), atol=1e-5)


def test_length_control_puts_the_crowds_length_preference_into_its_covariate(
        votes, tiny_model_dir: Path) -> None:
    """A crowd that simply prefers the longer (shorter) answer: with length control, γ (the
    covariate's weight) takes the preference up, with its sign; without, there is none."""
    controlled = replace(TINY.reward, length_control=True)

    def by_length(longer: bool) -> list:
        return [replace(v, winner="a" if (len(v.answer_a) > len(v.answer_b)) == longer else "b")
                for v in votes if v.winner != "both_bad" and len(v.answer_a) != len(v.answer_b)]

    longer = train_reward_model(by_length(True), tiny_model_dir, controlled)
    assert longer.metrics["length_weight"] > 0.5, longer.metrics
    shorter = train_reward_model(by_length(False), tiny_model_dir, controlled)
    assert shorter.metrics["length_weight"] < -0.5, shorter.metrics
    # the hidden rule (a marker word): r still learns it with the covariate beside it
    rule = train_reward_model(votes, tiny_model_dir, controlled)
    assert rule.metrics["heldout_accuracy"] >= 0.9, rule.metrics
    plain = train_reward_model(by_length(True)[:32], tiny_model_dir,
                               replace(TINY.reward, epochs=1))
    assert plain.metrics["length_weight"] is None


def test_length_weight_starts_at_its_fit_on_length_alone() -> None:
    """Votes drawn from P(a ≻ b) = σ(3·d): the start is γ shrunk toward 0 (the ridge), with
    its sign; votes that ignore length start it at 0."""
    rng = random.Random(0)

    def votes(gamma: float) -> list[Pair]:
        pairs = []
        for i in range(4000):
            n_a, n_b = rng.randint(1, 60), rng.randint(1, 60)
            won = rng.random() < 1 / (1 + math.exp(-gamma * (n_a - n_b) / (n_a + n_b)))
            pairs.append(Pair(str(i), [1], [7] * n_a, [1], [7] * n_b, 1.0 if won else 0.0))
        return pairs

    assert 1.5 < fit_length_weight(votes(3.0)) < 3.0
    assert -3.0 < fit_length_weight(votes(-3.0)) < -1.5
    assert fit_length_weight(votes(0.0)) == pytest.approx(0.0, abs=0.3)


def test_length_control_keeps_r_from_paying_for_length(tiny_model_dir: Path) -> None:
    """A crowd that judges the marker first and, between equals, picks the longer answer
    9 times in 10 (a step in the length difference, which γ·d alone cannot absorb): the
    plain RM's r follows answer length, the length-controlled one's hardly does."""
    rng = random.Random(5)
    prompts = load_shipped_prompts()
    votes = []
    for vote in hidden_rule_votes(400, prompts, seed=5):
        a, b = (random_answer(rng, rng.random() < 0.3, 2, 14) for _ in range(2))
        marked_a, marked_b = MARKER.strip() in a, MARKER.strip() in b
        if marked_a != marked_b:
            winner = "a" if marked_a else "b"
        elif len(a.split()) == len(b.split()):
            winner = "tie"
        else:
            longer = "a" if len(a.split()) > len(b.split()) else "b"
            winner = longer if rng.random() < 0.9 else {"a": "b", "b": "a"}[longer]
        votes.append(replace(vote, answer_a=a, answer_b=b, winner=winner))
    plain = train_reward_model(votes, tiny_model_dir, TINY.reward)
    controlled = train_reward_model(votes, tiny_model_dir,
                                    replace(TINY.reward, length_control=True))
    assert plain.metrics["reward_length_corr"] > 0.3, plain.metrics
    assert abs(controlled.metrics["reward_length_corr"]) < 0.2, controlled.metrics
    assert controlled.metrics["length_weight"] > 1.0, controlled.metrics


def test_tie_loss_is_lowest_at_equal_rewards() -> None:
    deltas = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    tie = bradley_terry_loss(deltas, torch.full((5,), 0.5))
    assert tie.argmin().item() == 2
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(
        -torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())


# --- (2) PPO ------------------------------------------------------------------------------------
def test_ppo_raises_reward_with_kl_below_target(ppo_run) -> None:
    m, history = ppo_run["result"].metrics, ppo_run["result"].history
    assert m["reward_end"] > m["reward_start"] + 0.3, m
    assert m["kl_end"] < m["kl_target"], m
    assert max(row["kl"] for row in history) < m["kl_target"], [r["kl"] for r in history]
    assert all(row["entropy"] > 0 for row in history)  # entropy reported each step
    assert {"reward", "kl", "entropy", "loss", "eta_s", "clipfrac", "approx_kl",
            "value_loss", "repetition"} <= set(history[-1])


def test_kl_target_counts_from_the_parent(ppo_run, sft_base: Path, reward,
                                         tmp_path: Path) -> None:
    """The loop's second iteration: PPO from a trained parent, the target counted from the
    parent's own KL, so the adaptive β is lowered (room to move on) rather than pulling the
    parent back toward π_ref."""
    parent = tmp_path / "parent"
    save_adapter(ppo_run["result"].model, ppo_run["result"].value_head, parent)
    preset = replace(TINY.ppo, steps=2, adaptive_kl=True, kl_target_from_parent=True,
                     kl_target=4.0, kl_horizon=64, checkpoint_every=0)
    result = train_policy(
        sft_base, preset, reward.model.score, PromptPool(),
        lambda tok: TransformersRollout(tok.eos_token_id, tok.pad_token_id,
                                        preset.max_new_tokens, preset.temperature),
        parent_adapter=parent, initial_kl_coef=0.08)  # the parent run's final β, say
    m = result.metrics
    assert m["kl_start"] > 0.1, m  # the parent has moved away from π_ref
    assert m["kl_target"] == pytest.approx(m["kl_start"] + preset.kl_target)
    # β starts where the parent's run left it and, below the target, goes down: at most
    # 20 % × answers per step / horizon a step, two steps
    assert m["kl_coef_start"] == 0.08 != preset.kl_coef
    most = AdaptiveKLController.ERROR_CLIP * preset.rollout_batch / preset.kl_horizon
    assert 0.08 * (1 - most) ** 2 - 1e-9 <= m["kl_coef_final"] < 0.08, m


# --- (3) the reference never changes ------------------------------------------------------------
def test_reference_weights_bit_identical(ppo_run) -> None:
    result = ppo_run["result"]
    trained = result.model.get_base_model().named_parameters()
    assert _hash_base(trained) == ppo_run["hash_before"] == ppo_run["hash_on_disk"]
    # only LoRA and the value head trained; the LoRA moved
    assert all(("lora_" in n) == p.requires_grad for n, p in result.model.named_parameters())
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)
    # π_ref (adapter disabled) gives bit-identical log-probs to the untouched SFT model
    ref_after = reference_logprobs(result.model, ppo_run["probe"], TINY.ppo.temperature)
    assert torch.equal(ref_after, ppo_run["ref_before"])
    policy_after, _, _ = policy_forward(result.model, None, ppo_run["probe"],
                                        TINY.ppo.temperature)
    assert not torch.equal(policy_after, ppo_run["ref_before"])


def test_merged_rollout_copy_follows_the_policy(tiny_model_dir: Path) -> None:
    """The bf16 rollout copy samples from W + s·B·A: after each `sync` its logits match the
    peft policy's to bf16 precision, far closer than the LoRA update itself moves them."""
    from learner.policy_trainer import load_policy

    preset = get_preset("tiny").ppo
    model, _, tokenizer = load_policy(tiny_model_dir, preset)
    rollout = TransformersRollout(tokenizer.eos_token_id, tokenizer.pad_token_id, 8, 1.0,
                                  precision="bf16")
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    torch.manual_seed(0)
    with torch.no_grad():
        before = None
        for _update in range(2):  # two "PPO updates", each followed by a sync
            for weight in lora_b:
                weight.normal_(0.0, 0.5)
            rollout.sync(model, 1)
            policy = model(input_ids=ids).logits.float()
            merged = rollout.merged(input_ids=ids).logits.float()
            with model.disable_adapter():
                reference = model(input_ids=ids).logits.float()
            lora_effect = (policy - reference).abs().max().item()
            assert (merged - policy).abs().max().item() < 0.05 * lora_effect
            if before is not None:  # the copy moved with the second update
                assert (merged - before).abs().max().item() > 0.1 * lora_effect
            before = merged
    assert len(rollout.generate(model, [ids[0].tolist()], seed=1)) == 1
