"""The PPO math of learner/ppo.py against hand computations (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from learner import ppo
from learner.policy_trainer import charge
from learner.presets import PRESETS, get_preset
from learner.sanity import answer_stats, repetition_share
from learner.sequences import cut_at_eos, pack

torch.set_num_threads(1)


def test_per_token_rewards_kl_everywhere_score_at_last_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 2: a one-token answer
    rewards, kl = ppo.per_token_rewards(logprobs, ref, torch.tensor([2.0, -1.0]), mask, 0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]]))
    # r_t = −β·kl_t, and the score is added at the last real token only
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.05 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_per_token_rewards_dense_scores_go_where_they_were_earned() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    dense = torch.tensor([[0.5, 1.0, 0.5], [-1.0, 7.0, 7.0]])  # row 2's 7s are padding
    rewards, _ = ppo.per_token_rewards(logprobs, ref, dense, mask, 0.1)
    expected = torch.tensor([[-0.05 + 0.5, 1.0, 0.1 + 0.5], [0.05 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)
    # the same total per answer as the sparse form with the row sums as scores
    sparse, _ = ppo.per_token_rewards(logprobs, ref, (dense * mask).sum(1), mask, 0.1)
    assert torch.allclose(rewards.sum(1), sparse.sum(1))


def test_gae_matches_hand_computation() -> None:
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th column is padding
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    # by hand, V = 0 and r = 0 after the end:
    d2 = 2.0 + gamma * 0.0 - 1.5  # 0.5
    d1 = 0.0 + gamma * 1.5 - 1.0  # 0.35
    d0 = 1.0 + gamma * 1.0 - 0.5  # 1.4
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0])


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    mask = torch.ones(1, 4)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    assert torch.allclose(ret, to_go)
    assert torch.allclose(adv, to_go - values)


def test_whiten_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    assert w[0, 3] == 0
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # unbiased var = 1
    kept = ppo.whiten(x, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0)


def test_clipped_policy_loss_clips_only_in_the_favourable_direction() -> None:
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0: clipped at 1.2), 0.5 (A>0: unclipped, pessimistic),
    # 1.5 (A<0: unclipped), 0.5 (A<0: clipped at 0.8)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    stats = ppo.clipped_policy_loss(new, old, adv, torch.ones(1, 4), 0.2)
    per_token = [-1.2, -0.5, 1.5, 0.8]
    assert stats.loss.item() == pytest.approx(sum(per_token) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.5, 0.5)) / 4
    assert stats.approx_kl.item() == pytest.approx(expected_kl)


def test_clipped_policy_loss_gradient_is_zero_when_clipped() -> None:
    new = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    stats = ppo.clipped_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    stats.loss.backward()
    assert new.grad.item() == 0.0


def test_clipped_value_loss() -> None:
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, clipfrac = ppo.clipped_value_loss(new, old, returns, torch.ones(1, 2), 0.2)
    # token 1: unclipped (2−2)² = 0, clipped (1.2−2)² = 0.64 → max 0.64
    # token 2: unclipped 1.1² = 1.21, clipped 1.1² = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_entropy_and_logprobs() -> None:
    logits = torch.zeros(1, 2, 8)  # uniform over 8
    assert ppo.entropy_from_logits(logits)[0].tolist() == pytest.approx([math.log(8)] * 2)
    tokens = torch.tensor([[3, 5]])
    assert ppo.logprobs_from_logits(logits, tokens)[0].tolist() == pytest.approx(
        [-math.log(8)] * 2)


def test_adaptive_kl_controller() -> None:
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    before = ctl.value
    ctl.update(3.0, n_steps=10)  # error −0.5 clipped to −0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 10 / 100))
    before = ctl.value
    ctl.update(6.0, n_steps=10)  # on target: unchanged
    assert ctl.value == pytest.approx(before)
    fixed = ppo.FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05


def test_pack_layout_positions_and_last_index() -> None:
    batch = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.last_index.tolist() == [4, 5]
    assert cut_at_eos([4, 2, 7, 2], 2) == [4, 2]


def test_repetition_share_is_the_sanity_gates_measure() -> None:
    assert repetition_share("the cat sat the cat sat") == pytest.approx(1 / 4)
    assert repetition_share("a fresh answer with no loop") == 0.0
    assert repetition_share("too short") == 0.0
    answers = ["the cat sat the cat sat", "a fresh answer with no loop"]
    pooled = answer_stats(answers, [False, True])["repetition"]
    assert pooled == pytest.approx(1 / (4 + 4))  # pooled over the answers' 3-grams


def test_charge_takes_a_penalty_from_the_score_or_the_last_token() -> None:
    batch = pack([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    penalty = torch.tensor([0.5, 2.0])
    assert charge(torch.zeros(2), batch, penalty).tolist() == [-0.5, -2.0]
    dense = torch.ones(2, 3)
    charged = charge(dense, batch, penalty)
    assert charged.tolist() == [[1.0, 1.0, 0.5], [-1.0, 1.0, 1.0]]  # at each last token
    assert dense.sum() == 6  # the caller's tensor is left alone


def test_presets_are_typed_and_have_the_documented_defaults() -> None:
    assert set(PRESETS) == {"tiny", "cpu", "cpu-length-control", "gpu"}
    # the length-controlled preset is the cpu one but for the reward model's covariate
    assert PRESETS["cpu-length-control"].ppo == PRESETS["cpu"].ppo
    assert PRESETS["cpu-length-control"].reward.length_control
    assert not PRESETS["cpu"].reward.length_control
    for preset in PRESETS.values():
        p = preset.ppo
        assert (p.clip_eps, p.value_clip, p.vf_coef, p.gamma, p.gae_lambda) == (
            0.2, 0.2, 0.1, 1.0, 0.95)
        assert p.ptx_coef == 0.0 and p.lora_rank <= 16  # vLLM's --max-lora-rank
        assert p.minibatch_size <= p.rollout_batch
    with pytest.raises(ValueError):
        get_preset("huge")
