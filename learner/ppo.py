"""The PPO-with-KL math, as pure tensor functions (no models), testable by hand.

Shapes: per-token tensors are (B, T) over the response tokens of a packed batch; `mask` is 1
on real response tokens and 0 on padding after the answer (sequences.py). Everything follows
"The N Implementation Details of RLHF with PPO" and CleanRL's ppo.py:

    kl_t      = log π(a_t|s_t) − log π_ref(a_t|s_t)              per-token KL estimate (k1)
    r_t       = −β·kl_t  (+ r_θ(x, y) at the last token)          per-token reward
    δ_t       = r_t + γ·V(s_{t+1}) − V(s_t)                       TD error (V = 0 after the end)
    A_t       = δ_t + γλ·A_{t+1}                                  GAE
    R_t       = A_t + V(s_t)                                      value target (return)
    ratio     = exp(log π_new − log π_old)
    L_policy  = E[max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))]
    L_value   = ½·E[max((V_new − R)², (V_old + clip(V_new − V_old, ±ε_v) − R)²)]
    L         = L_policy + c_v·L_value (+ c_ptx·L_LM on reference texts)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WHITEN_EPS = 1e-8


# --- masked statistics -------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(x − mean) / std over the real tokens; padding comes back as 0. `moments`: the
    (mean, variance) to use instead of x's own (data-parallel: those of every rank's x)."""
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean  # whiten rewards keeps their sign on average
    return out * mask


# --- rewards -------------------------------------------------------------------------------
def per_token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = −β·(log π − log π_ref) at every token, plus the RM score: all of it at the last
    token (`scores` of shape (B,)), or where the RM says each part was earned (`scores` of
    shape (B, T), summing to the answer's score: a dense reward, same total, less credit to
    assign).

    Returns (rewards, kl), both (B, T) and zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    if scores.dim() == 2:
        return rewards + scores * mask, kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # index of each answer's last token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards, kl


# --- advantages ----------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the tokens. Returns (A, R)."""
    values = values * mask  # V = 0 after the end of the answer: the episode is over
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error δ_t
        last_gae = delta + gamma * lam * last_gae  # A_t = δ_t + γλ·A_{t+1}
        advantages[:, t] = last_gae
    advantages = advantages * mask
    returns = advantages + values  # R_t = A_t + V(s_t)
    return advantages, returns


# --- losses --------------------------------------------------------------------------------
@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor  # share of tokens where the clip was active
    approx_kl: torch.Tensor  # E[(ratio − 1) − log ratio] (k3 estimator of KL(old ‖ new))


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor,
                        clip_eps: float) -> PolicyLossStats:
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)  # pessimistic bound
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return PolicyLossStats(loss, clipfrac, approx_kl)


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½·max((V − R)², (V_clipped − R)²), V_clipped kept within ±clip of the rollout's V.

    Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(new_values - old_values, -clip, clip)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ p·log p over the vocabulary, per token: (B, T, V) → (B, T)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) per position: (B, T, V), (B, T) → (B, T)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return torch.gather(log_p, 2, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KL of each answer: Σ_t (log π − log π_ref), nats per answer, (B,)."""
    return (kl * mask).sum(dim=1)


# --- KL coefficient --------------------------------------------------------------------------
class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    KL above target raises β (pull back to the reference), below lowers it."""

    ERROR_CLIP = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = max(-self.ERROR_CLIP,
                                 min(self.ERROR_CLIP, current_kl / self.target - 1.0))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
