"""PPO with a KL penalty on a LoRA policy, top to bottom (the math is in learner/ppo.py).

    policy    π  = frozen base + LoRA adapter (peft), from the parent version's adapter
    reference π_ref = the same network with the adapter disabled: the initial model, never
                 trained, only used for log-probabilities (no second copy in memory)
    value     V  = a linear head on the policy's own last hidden state (shared trunk), not a
                 separate value model
    reward       r_t = −β·(log π − log π_ref) per token + r_θ(x, y) (normalised RM score) at
                 the last token, or spread over the tokens that earned it when the RM has
                 a token sum (dense_reward; same total per answer), less the preset's
                 rule-based penalties at the last token: a cut-off answer
                 (missing_eos_penalty), repeated word 3-grams (repetition_penalty × share)

One PPO step: push the last update's adapter to the rollout backend → sample answers →
one no-grad pass each of policy (old log-probs, values), reference and reward model →
per-token rewards → GAE → a few epochs of clipped-surrogate + clipped-value updates on
minibatches → adapt β. Resumable: every `checkpoint_every` steps the full state (adapter,
value head, optimiser, β, RNG, history) is written atomically; a re-run resumes there.

Data-parallel (`parallel`, learner/data_parallel.py, under `accelerate launch`): every rank
samples its own rollout_batch / N answers (its own seeds), scores them and runs the same
number of minibatch updates on minibatch_size / N rows; DDP averages the gradients, so each
update is one over minibatch_size rows (the mean of the ranks' token means, where one process
takes one token mean over them all) and the weights stay equal on every rank (checked:
`grad_spread` in the history). Advantages are whitened with the mean and variance over
every rank's rollouts, and β adapts to the KL of all of them. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy.folders import atomic_dir
from learner import ppo
from learner.data_parallel import SINGLE, DataParallel, whole_tensors
from learner.precision import amp_dtype, autocast, pick_device
from learner.presets import PPOPreset, check_processes
from learner.prompt_pool import PromptPool
from learner.rollout import RolloutBackend
from learner.sanity import repetition_share
from learner.sequences import PackedBatch, encode_prompt, pack

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state.pt"  # tensors only: optimizer state, torch RNG
TRAINER_META_FILE = "trainer_state.json"  # the rest: step, KL coefficient, history, Python RNG
EVAL_SEED = 1234  # the before/after evaluation samples with the same seed
ADAM_EPS = 1e-5  # CleanRL's PPO
RANK_SEED_STRIDE = 10_007  # rank k samples with seed + k·stride: its own rollouts

# Normalised RM score per row (B,), or per response token (B, T) summing to it (dense).
RewardFn = Callable[[PackedBatch], torch.Tensor]
Progress = Callable[[dict[str, Any]], None]


# --- the models ------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's hidden state; starts at zero (N-details)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def load_policy(base_model: Path, preset: PPOPreset, parent_adapter: Path | None = None
                ) -> tuple[Any, ValueHead, Any]:
    """(peft model with a trainable adapter, value head, tokenizer). The parent's adapter
    (its rank and target modules included) is continued; with no parent, a fresh LoRA whose
    B = 0, i.e. the policy starts equal to the reference."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(base, parent_adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                          target_modules=list(preset.lora_targets), bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    model.eval()  # dropout off, in training too
    value_head = ValueHead(base.config.hidden_size)
    if parent_adapter is not None and (parent_adapter / VALUE_HEAD_FILE).is_file():
        value_head.load_state_dict(load_file(str(parent_adapter / VALUE_HEAD_FILE)))
    device = pick_device()
    return model.to(device), value_head.to(device), tokenizer


def _trunk_and_head(model: Any) -> tuple[nn.Module, nn.Module]:
    causal_lm = model.get_base_model()  # LoRA layers are injected in place
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def policy_forward(model: Any, value_head: ValueHead | None, batch: PackedBatch,
                   temperature: float, need_logits: bool = False,
                   amp: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π(a_t|s_t) and V(s_t) for every response token, from one trunk pass.

    The hidden state at column P−1+t has read the prompt and a_<t: it is s_t, from which a_t
    is predicted. Logits are divided by the sampling temperature (N-details). With `amp` the
    trunk runs in autocast; the LM head, value head and log-softmax stay fp32."""
    trunk, lm_head = _trunk_and_head(model)
    batch = batch.to(lm_head.weight.device)
    with autocast(amp, lm_head.weight.device):
        hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).last_hidden_state
    states = hidden[:, batch.prompt_width - 1: -1].float()  # s_0 … s_{T−1}
    logits = lm_head(states) / temperature
    logprobs = ppo.logprobs_from_logits(logits, batch.responses)
    values = value_head(states) if value_head is not None else None
    return logprobs, values, (logits if need_logits else None)


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so that one forward, the training
    one, yields both (what DDP wraps: it averages the gradients of what this forward used)."""

    def __init__(self, policy: Any, value_head: ValueHead) -> None:
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, batch: PackedBatch, temperature: float, amp: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return policy_forward(self.policy, self.value_head, batch, temperature,
                              need_logits=True, amp=amp)


def charge(scores: torch.Tensor, batch: PackedBatch, penalty: torch.Tensor) -> torch.Tensor:
    """Scores less a per-answer penalty: from the score, or (dense scores, (B, T)) from the
    last token's term."""
    if scores.dim() == 1:
        return scores - penalty
    scores = scores.clone()
    rows = torch.arange(len(scores), device=scores.device)
    scores[rows, batch.response_lengths.to(scores.device) - 1] -= penalty
    return scores


@torch.no_grad()
def reference_logprobs(model: Any, batch: PackedBatch, temperature: float,
                       amp: torch.dtype | None = None) -> torch.Tensor:
    """log π_ref: the same network with the LoRA adapter switched off."""
    with model.disable_adapter():
        logprobs, _, _ = policy_forward(model, None, batch, temperature, amp=amp)
    return logprobs


def ptx_loss(model: Any, texts: list[list[int]], pad_id: int,
             amp: torch.dtype | None = None) -> torch.Tensor:
    """InstructGPT's PPO-ptx term: plain LM loss on reference texts."""
    width = max(len(t) for t in texts)
    device = model.get_base_model().get_output_embeddings().weight.device
    ids = torch.tensor([t + [pad_id] * (width - len(t)) for t in texts], device=device)
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts], device=device)
    labels = ids.masked_fill(mask == 0, -100)
    with autocast(amp, device):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.float()


def sequence_scores(scores: torch.Tensor) -> torch.Tensor:
    """The answer's score (B,) from a sparse (B,) or dense (B, T) reward."""
    return scores.sum(dim=1) if scores.dim() == 2 else scores


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(model: Any, tokenizer: Any, rollout: RolloutBackend, reward_fn: RewardFn,
                    prompts: list[list[dict[str, str]]], preset: PPOPreset,
                    seed: int = EVAL_SEED, amp: torch.dtype | None = None,
                    parallel: DataParallel = SINGLE) -> dict[str, float]:
    """Mean normalised RM score and mean KL(π ‖ π_ref) per answer on fixed prompts, sampled
    with a fixed seed by the current rollout weights (data-parallel: each rank its share of
    the prompts, the means over all of them)."""
    prompt_ids = [encode_prompt(tokenizer, m, preset.max_prompt_tokens)
                  for m in parallel.shard(prompts)]
    rows: list[tuple[float, float, int]] = []
    if prompt_ids:
        responses = rollout.generate(model, prompt_ids, seed=seed)
        batch = pack(prompt_ids, responses, tokenizer.pad_token_id)
        logprobs, _, _ = policy_forward(model, None, batch, preset.temperature, amp=amp)
        ref = reference_logprobs(model, batch, preset.temperature, amp=amp)
        kl = ppo.sequence_kl(logprobs - ref, batch.response_mask.to(logprobs.device))
        rows = list(zip(sequence_scores(reward_fn(batch)).tolist(), kl.tolist(),
                        batch.response_lengths.tolist(), strict=True))
    every = torch.tensor(parallel.gather(rows), dtype=torch.float64)  # (prompts, 3)
    reward, kl_mean, tokens = every.mean(0).tolist()
    return {"reward": reward, "kl": kl_mean, "answer_tokens": tokens}


# --- checkpoints ---------------------------------------------------------------------------------
def save_adapter(model: Any, value_head: ValueHead, folder: Path) -> None:
    """A peft adapter folder vLLM can load, plus the value head beside it (ignored by vLLM)."""
    from safetensors.torch import save_file

    model.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
              str(folder / VALUE_HEAD_FILE))


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    found = sorted((p for p in checkpoint_dir.iterdir()
                    if p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE_FILE).is_file()
                    and (p / TRAINER_META_FILE).is_file()),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    return found[-1] if found else None


@dataclass
class TrainerState:
    step: int
    kl_coef: float
    history: list[dict[str, Any]]
    eval_start: dict[str, float]
    python_rng: Any
    torch_rng: torch.Tensor
    seconds: float


def checkpoint_tensors(trainee: nn.Module, model: Any, value_head: ValueHead,
                       optimizer: torch.optim.Optimizer, parallel: DataParallel = SINGLE
                       ) -> dict[str, Any]:
    """What a checkpoint holds as tensors, whole: the adapter, the value head and the
    optimiser state (torch's own; under FSDP torch.distributed.checkpoint's full state dict,
    by parameter name, which `load_checkpoint_state` shards again). Under FSDP every rank
    calls this (the shards are gathered); rank 0's result is the complete one."""
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    lora = whole_tensors({k: v for k, v in model.state_dict().items() if ".lora_" in k})
    return {
        "adapter": {k: v.detach().cpu().contiguous()
                    for k, v in get_peft_model_state_dict(model, state_dict=lora).items()},
        "value_head": {k: v.detach().cpu().contiguous()
                       for k, v in whole_tensors(value_head.state_dict()).items()},
        "optimizer": get_optimizer_state_dict(trainee, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)) if parallel.sharded
        else optimizer.state_dict(),
    }


def save_checkpoint(checkpoint_dir: Path, tensors: dict[str, Any], state: TrainerState) -> Path:
    from safetensors.torch import save_file

    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    with atomic_dir(final, kind="ckpt") as tmp:
        save_file(tensors["adapter"], str(tmp / "adapter.safetensors"))
        save_file(tensors["value_head"], str(tmp / VALUE_HEAD_FILE))
        # Resuming loads these with weights_only=True: tensors and plain containers here, the
        # rest as JSON, so a checkpoint file can never run code when it is read.
        torch.save({"optimizer": tensors["optimizer"], "torch_rng": state.torch_rng},
                   tmp / TRAINER_STATE_FILE)
        meta = {k: v for k, v in vars(state).items() if k != "torch_rng"}
        (tmp / TRAINER_META_FILE).write_text(json.dumps(meta))
    for old in checkpoint_dir.iterdir():  # keep only the newest
        if old.name.startswith(CHECKPOINT_PREFIX) and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_weights(folder: Path, model: Any, value_head: ValueHead) -> None:
    """The adapter and value head, into the model before it is prepared (sharded)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = value_head.linear.weight.device
    set_peft_model_state_dict(model, load_file(str(folder / "adapter.safetensors"),
                                               device=str(device)))
    value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE), device=str(device)))


def load_checkpoint_state(folder: Path, trainee: nn.Module, optimizer: torch.optim.Optimizer,
                          parallel: DataParallel = SINGLE) -> TrainerState:
    """The optimiser state (sharded again under FSDP) and the trainer's state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    device = next(trainee.parameters()).device
    # weights_only: a pickle that would build any other object is refused (UnpicklingError).
    saved = torch.load(folder / TRAINER_STATE_FILE, weights_only=True, map_location=device)
    if parallel.sharded:
        set_optimizer_state_dict(trainee, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved["optimizer"])
    meta = json.loads((folder / TRAINER_META_FILE).read_text())
    version, internal, gauss = meta["python_rng"]  # random.getstate()'s tuples, as JSON lists
    meta["python_rng"] = (version, tuple(internal), gauss)
    return TrainerState(**meta, torch_rng=saved["torch_rng"].cpu())


# --- training ------------------------------------------------------------------------------------
@dataclass
class PolicyTrainResult:
    model: Any
    value_head: ValueHead
    tokenizer: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_policy(base_model: Path, preset: PPOPreset, reward_fn: RewardFn, pool: PromptPool,
                 rollout_factory: Callable[[Any], RolloutBackend],
                 parent_adapter: Path | None = None, progress: Progress | None = None,
                 checkpoint_dir: Path | None = None,
                 ptx_texts: list[list[int]] | None = None,
                 guard: Callable[[], None] | None = None,
                 initial_kl_coef: float | None = None,
                 parallel: DataParallel = SINGLE) -> PolicyTrainResult:
    """Run `preset.steps` PPO steps; `rollout_factory(tokenizer)` builds the rollout backend.
    `guard()` runs before each checkpoint write and raises if this run may no longer write
    (it lost the learner lock). `initial_kl_coef`: where the adaptive β starts (the parent
    run's final β, so that one controller spans the loop's iterations; None: the preset's)."""
    check_processes(preset, parallel.world)
    rollout_batch = preset.rollout_batch // parallel.world  # this rank's answers per step
    minibatch_size = preset.minibatch_size // parallel.world
    torch.manual_seed(preset.seed)  # the same initial weights on every rank
    rank_seed = preset.seed + RANK_SEED_STRIDE * parallel.rank  # its own rollouts
    rng = random.Random(rank_seed)
    model, value_head, tokenizer = load_policy(base_model, preset, parent_adapter)
    if parallel.rank:
        torch.manual_seed(rank_seed)
    device = value_head.linear.weight.device
    amp = amp_dtype(preset.precision, device)  # bf16 autocast of the trunk, or None
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    if parallel.sharded and preset.ptx_coef > 0:
        raise ValueError("ptx_coef > 0 is not supported with FSDP: its LM loss runs outside "
                         "the sharded training forward")
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is not None:  # into the whole weights, before they are sharded
        load_checkpoint_weights(checkpoint, model, value_head)
    trainee = parallel.prepare(PolicyWithValue(model, value_head))  # DDP/FSDP (itself if 1)
    params = [p for p in trainee.parameters() if p.requires_grad]  # LoRA + value head
    optimizer = torch.optim.AdamW(params, lr=preset.lr, eps=ADAM_EPS, weight_decay=0.0)
    eval_prompts = pool.fixed(preset.eval_prompts)
    rollout = rollout_factory(tokenizer)
    try:
        # 0. Start, or resume from the last complete checkpoint of this run.
        start_step, history, seconds_before = 0, [], 0.0
        state = None
        if checkpoint is not None:
            state = load_checkpoint_state(checkpoint, trainee, optimizer, parallel)
            start_step, history, eval_start = state.step, state.history, state.eval_start
            seconds_before = state.seconds
            rng.setstate(state.python_rng)
            torch.set_rng_state(state.torch_rng)
            if parallel.rank:  # rank 0's saved RNG: the others draw their own again
                rng.seed(rank_seed + start_step)
                torch.manual_seed(rank_seed + start_step)
            log.info("resuming PPO from %s (step %d)", checkpoint, start_step)
            with parallel.whole(trainee):
                rollout.sync(model, start_step)
        else:
            with parallel.whole(trainee):
                rollout.sync(model, 0)
                eval_start = evaluate_policy(model, tokenizer, rollout, reward_fn, eval_prompts,
                                             preset, amp=amp, parallel=parallel)
        # The KL target: absolute, or counted from where the parent already is (its KL to
        # π_ref on the evaluation prompts), so that every iteration of the loop may move
        # `kl_target` nats further than its parent instead of being pulled back to the base.
        kl_target = preset.kl_target + (max(0.0, eval_start["kl"])
                                        if preset.kl_target_from_parent else 0.0)
        kl_coef_start = initial_kl_coef or preset.kl_coef
        kl_ctl: ppo.FixedKLController | ppo.AdaptiveKLController = (
            ppo.AdaptiveKLController(kl_coef_start, kl_target, preset.kl_horizon)
            if preset.adaptive_kl else ppo.FixedKLController(preset.kl_coef))
        if state is not None:
            kl_ctl.value = state.kl_coef
        started = time.monotonic()

        for step in range(start_step, preset.steps):
            step_started = time.monotonic()
            # 1. Rollout: sample one answer per prompt from the current policy, after pushing
            # the last update's weights to the rollout backend (vLLM: a fresh adapter name).
            messages = pool.sample(rollout_batch, rng)
            prompt_ids = [encode_prompt(tokenizer, m, preset.max_prompt_tokens) for m in messages]
            with parallel.whole(trainee):  # FSDP: sync, sample and score with whole weights
                if step > start_step:  # the first step's weights were pushed above
                    rollout.sync(model, step)
                responses = rollout.generate(model, prompt_ids)
                batch = pack(prompt_ids, responses, pad_id).to(device)
                mask = batch.response_mask
                generate_s = time.monotonic() - step_started

                # 2. Score: old log-probs and values (policy), reference log-probs, RM score.
                with torch.no_grad():
                    old_logprobs, old_values, _ = policy_forward(model, value_head, batch,
                                                                 preset.temperature, amp=amp)
                    ref_logprobs = reference_logprobs(model, batch, preset.temperature, amp=amp)
                    scores = reward_fn(batch).to(device)
                    ended = torch.tensor([r[-1] == eos_id for r in responses], device=device)
                    repeated = torch.tensor([repetition_share(tokenizer.decode(
                        r, skip_special_tokens=True)) for r in responses], device=device)
                    if preset.missing_eos_penalty is not None:
                        scores = charge(scores, batch, torch.where(ended, 0.0,
                                                                   preset.missing_eos_penalty))
                    if preset.repetition_penalty is not None:
                        scores = charge(scores, batch, preset.repetition_penalty * repeated)

                    # 3. Per-token rewards r_t = −β·kl_t (+ score at the last token), then GAE.
                    rewards, kl = ppo.per_token_rewards(old_logprobs, ref_logprobs, scores, mask,
                                                        kl_ctl.value)
                    if preset.whiten_rewards:
                        rewards = ppo.whiten(rewards, mask, shift_mean=False,
                                             moments=parallel.masked_moments(rewards, mask))
                    advantages, returns = ppo.gae(rewards, old_values, mask, preset.gamma,
                                                  preset.gae_lambda)
                    if preset.whiten_advantages:
                        advantages = ppo.whiten(advantages, mask,
                                                moments=parallel.masked_moments(advantages, mask))

            score_s = time.monotonic() - step_started - generate_s

            # 4. PPO epochs: clipped surrogate + clipped value loss on shuffled minibatches.
            stats: dict[str, list[float]] = {k: [] for k in (
                "policy_loss", "value_loss", "loss", "clipfrac", "value_clipfrac", "approx_kl",
                "entropy", "ptx_loss")}
            grad_spread = 0.0
            for epoch in range(preset.ppo_epochs):
                order = torch.randperm(rollout_batch).to(device)
                for start in range(0, rollout_batch, minibatch_size):
                    rows = order[start:start + minibatch_size]
                    mb = batch.select(rows)
                    mb_mask = mask[rows]
                    new_logprobs, new_values, logits = trainee(mb, preset.temperature, amp)
                    pg = ppo.clipped_policy_loss(new_logprobs, old_logprobs[rows],
                                                 advantages[rows], mb_mask, preset.clip_eps)
                    vf_loss, vf_clipfrac = ppo.clipped_value_loss(
                        new_values, old_values[rows], returns[rows], mb_mask, preset.value_clip)
                    loss = pg.loss + preset.vf_coef * vf_loss
                    if preset.ptx_coef > 0 and ptx_texts:
                        texts = rng.sample(ptx_texts, min(preset.ptx_batch, len(ptx_texts)))
                        lm_loss = ptx_loss(model, texts, pad_id, amp)
                        loss = loss + preset.ptx_coef * lm_loss
                        stats["ptx_loss"].append(lm_loss.item())
                    optimizer.zero_grad()
                    loss.backward()  # DDP: the gradients are now the ranks' average
                    if epoch == 0 and start == 0:  # every rank about to take the same step?
                        grad_spread = parallel.gradient_spread(params)
                    torch.nn.utils.clip_grad_norm_(params, preset.max_grad_norm)
                    optimizer.step()
                    with torch.no_grad():
                        entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), mb_mask)
                    for key, value in (("policy_loss", pg.loss), ("value_loss", vf_loss),
                                       ("loss", loss), ("clipfrac", pg.clipfrac),
                                       ("value_clipfrac", vf_clipfrac),
                                       ("approx_kl", pg.approx_kl), ("entropy", entropy)):
                        stats[key].append(value.item())

            update_s = time.monotonic() - step_started - generate_s - score_s

            # 5. Adapt β toward the KL target (a no-op for the fixed controller).
            mean_kl = parallel.mean(ppo.sequence_kl(kl, mask).mean().item())
            kl_coef_used = kl_ctl.value
            kl_ctl.update(mean_kl, preset.rollout_batch)

            # 6. Report (the figures of the answers are means over every rank's).
            done = step + 1
            elapsed = time.monotonic() - started
            eta = elapsed / (done - start_step) * (preset.steps - done)
            row = {
                "step": done, "total": preset.steps,
                "reward": parallel.mean(sequence_scores(scores).mean().item()),
                "kl": mean_kl, "kl_coef": kl_coef_used,
                "non_score_reward": (-kl_coef_used * mean_kl),
                "answer_tokens": parallel.mean(batch.response_lengths.float().mean().item()),
                "ended_share": parallel.mean(ended.float().mean().item()),
                "repetition": parallel.mean(repeated.mean().item()),
                "generate_s": generate_s, "score_s": score_s, "update_s": update_s,
                "step_s": time.monotonic() - step_started,
                "eta_s": eta, **{k: (parallel.mean(sum(v) / len(v)) if v else None)
                                 for k, v in stats.items()},
                "grad_spread": grad_spread, "processes": parallel.world,
            }
            history.append(row)
            log.info("ppo step %d/%d reward %.3f kl %.3f (target %.1f, β %.4f) entropy %.3f "
                     "loss %.4f eta %.0fs", done, preset.steps, row["reward"], mean_kl,
                     kl_target, kl_coef_used, row["entropy"], row["loss"], eta)
            if progress is not None:
                progress({"phase": "policy", **row})
            if (checkpoint_dir is not None and preset.checkpoint_every
                    and done % preset.checkpoint_every == 0 and done < preset.steps):
                tensors = checkpoint_tensors(trainee, model, value_head, optimizer, parallel)
                if parallel.is_main:
                    if guard is not None:
                        guard()
                    save_checkpoint(checkpoint_dir, tensors, TrainerState(
                        done, kl_ctl.value, history, eval_start, rng.getstate(),
                        torch.get_rng_state(), seconds_before + elapsed))

        # 7. Evaluate the trained policy on the same prompts and seed as at the start.
        with parallel.whole(trainee):
            rollout.sync(model, preset.steps)
            eval_end = evaluate_policy(model, tokenizer, rollout, reward_fn, eval_prompts,
                                       preset, amp=amp, parallel=parallel)
        seconds = seconds_before + time.monotonic() - started
        samples = preset.steps * preset.rollout_batch
        metrics = {
            "reward_start": eval_start["reward"], "reward_end": eval_end["reward"],
            "kl_start": eval_start["kl"], "kl_end": eval_end["kl"],
            "kl_target": kl_target, "kl_coef_start": kl_coef_start,
            "kl_coef_final": kl_ctl.value,
            "answer_tokens_end": eval_end["answer_tokens"], "steps": preset.steps,
            "resumed_from_step": start_step, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else math.nan,
            "rollout_backend": rollout.name, "device": device.type,
            "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "processes": parallel.world,
            "grad_spread_max": max((row["grad_spread"] for row in history
                                    if row.get("grad_spread") is not None),
                                   default=None if parallel.sharded else 0.0),
        }
        if parallel.sharded:  # rank 0 checks, samples and saves it alone: whole weights
            whole = parallel.unsharded(trainee, lambda: PolicyWithValue(*load_policy(
                base_model, preset, parent_adapter)[:2]))
            model, value_head = whole.policy, whole.value_head  # type: ignore[assignment]
        return PolicyTrainResult(model, value_head, tokenizer, metrics, history)
    finally:
        rollout.close()
