"""The reward ("preference") model: base LM trunk + LoRA + a scalar head on the last token of
the answer, trained on arena votes with the pairwise Bradley–Terry loss.

    r(x, y)  = w · h_last(x, y) + b  +  Σ_t u · h_t(x, y) / TOKEN_SUM_SCALE
               h_last: final hidden state at the answer's last token; h_t: at answer token t
    P(a ≻ b) = σ(r(x_a, y_a) − r(x_b, y_b))
    loss     = −[ t·log σ(Δ) + (1 − t)·log σ(−Δ) ],  Δ = r_a − r_b

with the target t = 1 when a won, 0 when b won (both the plain −log σ(r_w − r_l)), and for
the two other outcomes:

* tie      → t = ½: the loss −½[log σ(Δ) + log σ(−Δ)] is smallest at Δ = 0, i.e. it teaches
             "these two are equally good" (FastChat counts a tie as half a win the same way).
             `tie_mode="skip"` drops ties instead.
* both_bad → skipped. The vote says both answers are bad, not which is better; a pairwise
             loss only sees the difference r_a − r_b, so it cannot express "both low" without
             an absolute anchor we do not have. Counted in the manifest, not trained on.

Votes between two samples of the same version (model_a == model_b, the cold start) are
ordinary pairs: the comparison is between answers, not versions.

Why the token sum (`RewardPreset.token_sum`): what a crowd prefers is often a count over
the answer's tokens (a word used less, a noun mentioned more, lists, digits). Read at the
last token alone, such a count must be gathered by attention before the RM can score it,
and a few hundred votes do not teach that; the sum gives every token a direct, additive
say, so a count is one linear direction (u). The last-token term keeps what only the whole
answer shows. u starts at zero: before training the RM is the plain last-token one.

Details that matter (N implementation details of RLHF): the reward is read at the last real
answer token (padding found from lengths, position ids from the attention mask, see
sequences.py); the head starts small, N(0, 1/√(d+1)), so early rewards are near 0; dropout
is off; after training, the mean and std of the scores on the training answers are stored
and `score()` returns (r − mean) / std, the stable scale the policy trains against.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from feedback.vote_record import VoteRecord
from learner.precision import amp_dtype, autocast, pick_device
from learner.presets import Precision, RewardPreset
from learner.sequences import PackedBatch, encode_answer, encode_prompt, pack

REWARD_HEAD_FILE = "reward_head.safetensors"
HELD_OUT_BUCKETS = 100  # the held-out split is hash(vote id) mod 100 < eval_percent
TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}  # P(a ≻ b) the loss aims at, per outcome
NORM_EPS = 1e-6
TOKEN_SUM_SCALE = 32.0  # the token sum counts in units of 32 tokens: O(1) for answers we score
# Scores of 2 x 256 answers pin the scale to a few per cent; scoring every training answer
# took as long as a third of the training itself.
NORM_SAMPLE_PAIRS = 256

Progress = Callable[[dict[str, Any]], None]


# --- the model ------------------------------------------------------------------------
class RewardModel(nn.Module):
    def __init__(self, trunk: nn.Module, hidden_size: int, token_sum: bool = True) -> None:
        super().__init__()
        self.trunk = trunk  # decoder without LM head, LoRA inside (peft)
        self.head = nn.Linear(hidden_size, 1)
        # Small init: N(0, 1/√(d+1)) keeps the initial rewards near zero.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        # u of the token sum (module doc); None = last-token readout only.
        self.token_head = nn.Linear(hidden_size, 1, bias=False) if token_sum else None
        if self.token_head is not None:
            nn.init.zeros_(self.token_head.weight)
        # Normalisation of the scores seen by the policy: (r − mean) / std on training data.
        self.register_buffer("reward_mean", torch.tensor(0.0))
        self.register_buffer("reward_std", torch.tensor(1.0))
        self.amp: torch.dtype | None = None  # autocast dtype of the trunk (precision.py)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def terms(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two parts of r(x, y): the last-token term w·h_last + b, (B,), and the token
        sum's terms u·h_t / TOKEN_SUM_SCALE per answer token, (B, T) (None without it)."""
        batch = batch.to(self.device)
        with autocast(self.amp, self.device):
            hidden = self.trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=self.device)
        last = self.head(hidden[rows, batch.last_index].float()).squeeze(-1)  # last real token
        if self.token_head is None:
            return last, None
        per_token = self.token_head(hidden[:, batch.prompt_width:].float()).squeeze(-1)
        return last, per_token * batch.response_mask / TOKEN_SUM_SCALE

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Raw reward r(x, y) of each row, shape (B,)."""
        last, tokens = self.terms(batch)
        return last if tokens is None else last + tokens.sum(-1)

    @torch.no_grad()
    def score(self, batch: PackedBatch) -> torch.Tensor:
        """Normalised reward (r − mean) / std: what PPO receives."""
        return (self(batch) - self.reward_mean) / self.reward_std

    @torch.no_grad()
    def score_tokens(self, batch: PackedBatch) -> torch.Tensor:
        """The same normalised reward spread over the answer's tokens, (B, T): the token
        sum's terms where they were earned, the last-token term (and −mean) at the end.
        Row sums equal `score`; a causal trunk makes token t's term depend on tokens ≤ t
        only, so it is a reward PPO may credit there."""
        last, tokens = self.terms(batch)
        if tokens is None:
            raise ValueError("this reward model has no token sum: use score()")
        rows = torch.arange(tokens.shape[0], device=self.device)
        dense = tokens.clone()
        dense[rows, batch.response_lengths.to(self.device) - 1] += last - self.reward_mean
        return dense / self.reward_std


def build_reward_model(base_model: Path, preset: RewardPreset) -> tuple[RewardModel, Any]:
    """Base trunk (no LM head: the reward model never needs the vocabulary projection) with a
    fresh LoRA adapter and a fresh head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    trunk = AutoModel.from_pretrained(base_model, dtype=torch.float32)
    n_layers = trunk.config.num_hidden_layers
    top = None if preset.lora_layers is None or preset.lora_layers >= n_layers else \
        list(range(n_layers - preset.lora_layers, n_layers))  # the chosen trainable layers
    lora = LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                      target_modules=list(preset.lora_targets), bias="none",
                      layers_to_transform=top, layers_pattern="layers" if top else None)
    trunk = get_peft_model(trunk, lora)
    model = RewardModel(trunk, trunk.config.hidden_size, token_sum=preset.token_sum)
    device = pick_device()
    model.to(device).eval()  # dropout off, in training too
    model.amp = amp_dtype(preset.precision, device)
    return model, tokenizer


def save_reward_model(model: RewardModel, folder: Path) -> None:
    from safetensors.torch import save_file

    model.trunk.save_pretrained(folder, safe_serialization=True)
    tensors = {"weight": model.head.weight.detach().cpu().contiguous(),
               "bias": model.head.bias.detach().cpu().contiguous(),
               "reward_mean": model.reward_mean.reshape(1).cpu(),
               "reward_std": model.reward_std.reshape(1).cpu()}
    if model.token_head is not None:
        tensors["token_weight"] = model.token_head.weight.detach().cpu().contiguous()
    save_file(tensors, str(folder / REWARD_HEAD_FILE))


def load_reward_model(folder: Path, base_model: Path,
                      precision: Precision = "auto") -> tuple[RewardModel, Any]:
    """A trained `rm-vN` for scoring (frozen)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    trunk = PeftModel.from_pretrained(AutoModel.from_pretrained(base_model, dtype=torch.float32),
                                      folder, is_trainable=False)
    head = load_file(str(folder / REWARD_HEAD_FILE))
    model = RewardModel(trunk, trunk.config.hidden_size, token_sum="token_weight" in head)
    with torch.no_grad():
        if model.token_head is not None:
            model.token_head.weight.copy_(head["token_weight"])
        model.head.weight.copy_(head["weight"])
        model.head.bias.copy_(head["bias"])
        model.reward_mean.copy_(head["reward_mean"][0])
        model.reward_std.copy_(head["reward_std"][0])
    device = pick_device()
    model.to(device).eval().requires_grad_(False)
    model.amp = amp_dtype(precision, device)
    return model, tokenizer


# --- votes → training pairs --------------------------------------------------------------
@dataclass
class Pair:
    vote_id: str
    prompt_a: list[int]
    answer_a: list[int]
    prompt_b: list[int]
    answer_b: list[int]
    target: float  # P(a ≻ b) the loss aims at


@dataclass
class PairCounts:
    decisive: int = 0
    ties: int = 0
    ties_skipped: int = 0
    both_bad_skipped: int = 0
    self_pairs: int = 0


def votes_to_pairs(votes: list[VoteRecord], tokenizer: Any,
                   preset: RewardPreset) -> tuple[list[Pair], PairCounts]:
    pairs, counts = [], PairCounts()
    for vote in votes:
        if vote.winner == "both_bad":
            counts.both_bad_skipped += 1  # no ranking information (see module docstring)
            continue
        if vote.winner == "tie" and preset.tie_mode == "skip":
            counts.ties_skipped += 1
            continue
        counts.ties += vote.winner == "tie"
        counts.decisive += vote.winner in ("a", "b")
        counts.self_pairs += vote.model_a == vote.model_b  # an ordinary pair all the same
        pairs.append(Pair(
            vote.vote_id,
            encode_prompt(tokenizer, vote.conversation_a, preset.max_prompt_tokens),
            encode_answer(tokenizer, vote.answer_a, preset.max_answer_tokens),
            encode_prompt(tokenizer, vote.conversation_b, preset.max_prompt_tokens),
            encode_answer(tokenizer, vote.answer_b, preset.max_answer_tokens),
            TARGET[vote.winner],
        ))
    return pairs, counts


def is_held_out(vote_id: str, eval_percent: int) -> bool:
    """Stable split: the same vote is always on the same side, run after run."""
    bucket = int(hashlib.sha256(vote_id.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS
    return bucket < eval_percent


def pair_batch(pairs: list[Pair], pad_id: int) -> PackedBatch:
    """Rows 0..n−1 are the a sides, rows n..2n−1 the b sides."""
    return pack([p.prompt_a for p in pairs] + [p.prompt_b for p in pairs],
                [p.answer_a for p in pairs] + [p.answer_b for p in pairs], pad_id)


# --- the loss ------------------------------------------------------------------------------
def bradley_terry_loss(delta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−[t·log σ(Δ) + (1 − t)·log σ(−Δ)] per pair; t = 1 gives −log σ(r_w − r_l)."""
    return -(target * F.logsigmoid(delta) + (1 - target) * F.logsigmoid(-delta))


def pair_deltas(model: RewardModel, pairs: list[Pair], pad_id: int) -> torch.Tensor:
    rewards = model(pair_batch(pairs, pad_id))
    return rewards[: len(pairs)] - rewards[len(pairs):]  # Δ = r_a − r_b


def pair_metrics(deltas: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """Accuracy on decisive votes (the winner scored higher), calibration = mean |p − outcome|
    with p = σ(Δ) and outcome 1 / 0 / ½ (a won / b won / tie), and the mean BT loss."""
    decisive = targets != 0.5
    correct = (deltas > 0) == (targets == 1.0)
    return {
        "accuracy": correct[decisive].float().mean().item() if decisive.any() else None,
        "calibration": (torch.sigmoid(deltas) - targets).abs().mean().item(),
        "loss": bradley_terry_loss(deltas, targets).mean().item(),
        "n": int(deltas.numel()),
    }


@torch.no_grad()
def evaluate_pairs(model: RewardModel, pairs: list[Pair], pad_id: int,
                   batch_size: int) -> dict[str, float | None]:
    if not pairs:
        return {"accuracy": None, "calibration": None, "loss": None, "n": 0}
    deltas = torch.cat([pair_deltas(model, pairs[i:i + batch_size], pad_id)
                        for i in range(0, len(pairs), batch_size)])
    return pair_metrics(deltas, torch.tensor([p.target for p in pairs], device=deltas.device))


# --- training ------------------------------------------------------------------------------
@dataclass
class RewardTrainResult:
    model: RewardModel
    tokenizer: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_reward_model(votes: list[VoteRecord], base_model: Path, preset: RewardPreset,
                       progress: Progress | None = None) -> RewardTrainResult:
    torch.manual_seed(preset.seed)
    rng = random.Random(preset.seed)
    model, tokenizer = build_reward_model(base_model, preset)
    pad_id = tokenizer.pad_token_id

    # 1. Votes → pairs, split into train / held-out by a hash of the vote id.
    pairs, counts = votes_to_pairs(votes, tokenizer, preset)
    train = [p for p in pairs if not is_held_out(p.vote_id, preset.eval_percent)]
    held_out = [p for p in pairs if is_held_out(p.vote_id, preset.eval_percent)]
    if preset.max_train_pairs is not None:  # votes come oldest first: keep the newest
        train = train[-preset.max_train_pairs:]
        held_out = held_out[-max(1, preset.max_train_pairs * preset.eval_percent // 100):]
    if not train:
        raise ValueError(f"no trainable votes among {len(votes)} (both_bad and skipped ties "
                         "carry no ranking)")

    params = [p for p in model.parameters() if p.requires_grad]  # LoRA + heads
    # The heads start from (near) zero and are a few hundred weights: at the LoRA's rate
    # they would barely move in one pass over a few hundred votes.
    heads = {id(p) for name, p in model.named_parameters() if name.startswith(("head.",
                                                                              "token_head."))}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if id(p) not in heads], "lr": preset.lr},
         {"params": [p for p in params if id(p) in heads], "lr": preset.head_lr or preset.lr}],
        weight_decay=preset.weight_decay)
    steps_per_epoch = math.ceil(len(train) / preset.batch_size)
    total = preset.epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    step, started = 0, time.monotonic()

    # 2. Epochs over shuffled pairs: BT loss on Δ = r_a − r_b.
    for epoch in range(preset.epochs):
        rng.shuffle(train)
        epoch_loss = 0.0
        for start in range(0, len(train), preset.batch_size):
            chunk = train[start:start + preset.batch_size]
            targets = torch.tensor([p.target for p in chunk], device=model.device)
            loss = bradley_terry_loss(pair_deltas(model, chunk, pad_id), targets).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, preset.max_grad_norm)
            optimizer.step()
            step += 1
            epoch_loss += loss.item() * len(chunk)
            if progress is not None:
                elapsed = time.monotonic() - started
                progress({"phase": "reward_model", "step": step, "total": total,
                          "loss": loss.item(), "eta_s": elapsed / step * (total - step)})
            if preset.eval_every_steps and step % preset.eval_every_steps == 0 and step < total:
                held = evaluate_pairs(model, held_out, pad_id, preset.batch_size)
                history.append({"step": step, "epoch": step / steps_per_epoch,
                                "train_loss": loss.item(), "heldout_accuracy": held["accuracy"],
                                "heldout_calibration": held["calibration"],
                                "heldout_loss": held["loss"]})
        held = evaluate_pairs(model, held_out, pad_id, preset.batch_size)
        history.append({"step": step, "epoch": epoch + 1, "train_loss": epoch_loss / len(train),
                        "heldout_accuracy": held["accuracy"],
                        "heldout_calibration": held["calibration"],
                        "heldout_loss": held["loss"]})

    # 3. Normalisation: mean and std of the raw scores of (a random sample of at most
    #    NORM_SAMPLE_PAIRS) training pairs; the same pass gives the training accuracy. The
    #    held-out figures are those after the last step.
    sample = random.Random(preset.seed).sample(train, min(len(train), NORM_SAMPLE_PAIRS))
    with torch.no_grad():
        scored = [model(pair_batch(sample[i:i + preset.batch_size], pad_id)).split(
            len(sample[i:i + preset.batch_size]))
            for i in range(0, len(sample), preset.batch_size)]
        r_a = torch.cat([a for a, _ in scored])
        r_b = torch.cat([b for _, b in scored])
        raw = torch.cat([r_a, r_b])
        model.reward_mean.copy_(raw.mean())
        model.reward_std.copy_(raw.std().clamp(min=NORM_EPS))
        train_eval = pair_metrics(r_a - r_b, torch.tensor([p.target for p in sample],
                                                          device=model.device))
    held = {"accuracy": history[-1]["heldout_accuracy"],
            "calibration": history[-1]["heldout_calibration"],
            "loss": history[-1]["heldout_loss"]}
    metrics = {
        "heldout_accuracy": held["accuracy"], "heldout_calibration": held["calibration"],
        "heldout_loss": held["loss"], "n_heldout": len(held_out),
        "train_accuracy": train_eval["accuracy"], "train_loss": train_eval["loss"],
        "n_train": len(train), "pairs": vars(counts),
        "reward_mean": model.reward_mean.item(), "reward_std": model.reward_std.item(),
        "steps": step, "seconds": time.monotonic() - started,
    }
    model.requires_grad_(False)
    return RewardTrainResult(model, tokenizer, metrics, history)
