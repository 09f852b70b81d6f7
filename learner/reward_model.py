"""The reward ("preference") model: base LM trunk (+ LoRA, or frozen: the probe below) + scalar
heads on the answer's tokens, trained on arena votes with the pairwise Bradley–Terry loss.

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

The probe (`lora_layers=0`, the `cpu` preset): no LoRA at all. The trunk is the frozen base
cut after `readout_layer` layers (the layers above are dropped, never computed), its hidden
states standardised per dimension, z_t = (h_t − μ) / σ with μ, σ over the training answers'
tokens, and only the heads learn, with an L2 penalty λ(|w|² + |u|²) (`head_l2`):

    r(x, y)  = Σ_t u · z_t(x, y) / TOKEN_SUM_SCALE      (pooling "sum", last_token off)

Why: a few hundred votes are too few to train even a LoRA without it memorising them (train
accuracy 0.89, held-out 0.56 against the judge's own labels, presets.py), and the final
layer is the worst place to read a text's properties: it is tuned to predict the next token.
Mid-layer states, pooled over the answer, are linear in what a crowd judges (words used,
topic kept, form), so a regularised linear readout on them learns from few votes, and its
training is seconds on cached states.

Why the frozen-layer cache (`FrozenCache`): with LoRA on the top `lora_layers` layers only,
the layers below see frozen weights, so their output for a given text never changes during
training. It is computed once per answer (one no-grad pass that stops at the first trainable
layer) and each step runs only the top layers on it: an epoch costs the top layers' forward
and backward, so a few hundred votes can be seen several times in the time one plain epoch
took (a few hundred votes underfit in one pass: train loss ≈ ln 2).

Length control (`RewardPreset.length_control`, off by default): a crowd that prefers the
longer answer teaches the RM to pay for length, and PPO then wins by writing more. As in
Chatbot Arena's style control (elo/style_control.py), the length difference is a covariate of
the training loss only:

    P(a ≻ b) = σ(r_a − r_b + γ·d),   d = (n_a − n_b) / (n_a + n_b),  n = answer tokens

γ is one unpenalised scalar, started at its fit to the votes on d alone (so r is not taught
the length preference while γ catches up) and then learned with r, so the part of the votes
that length explains goes to γ, not to r (whose heads pay the L2); PPO receives r alone.
A crowd that picks the longer answer whatever the margin is a step in d, which γ·d cannot
take up whole: the rest would go to r, so the loss also pays corr(r, n)² over each batch's
answers (as ODIN, Chen et al. 2024, decorrelates its quality head from length). The
manifest records γ and r's correlation with length (`reward_length_corr`).
Measured (benchmarks/length_control.py, tiny model, 3 seeds): corr(r, words) +0.63 plain,
+0.15 controlled; PPO's answers 1.74x the base's length on the plain RM, 1.33x controlled,
1.36x for an RM of a crowd that ignores length.

Details that matter (N implementation details of RLHF): the reward is read at the last real
answer token (padding found from lengths, position ids from the attention mask, see
sequences.py); the head starts small, N(0, 1/√(d+1)), so early rewards are near 0; dropout
is off; after training, the mean and std of the scores on the training answers are stored
and `score()` returns (r − mean) / std, the stable scale the policy trains against.
"""

from __future__ import annotations

import hashlib
import logging
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
from learner.data_parallel import SINGLE, DataParallel
from learner.precision import amp_dtype, autocast, pick_device
from learner.presets import Pooling, Precision, RewardPreset
from learner.sequences import PackedBatch, encode_answer, encode_prompt, pack

log = logging.getLogger(__name__)

REWARD_HEAD_FILE = "reward_head.safetensors"
HELD_OUT_BUCKETS = 100  # the held-out split is hash(vote id) mod 100 < eval_percent
TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}  # P(a ≻ b) the loss aims at, per outcome
NORM_EPS = 1e-6
TOKEN_SUM_SCALE = 32.0  # the token sum counts in units of 32 tokens: O(1) for answers we score
LENGTH_WEIGHT_LR = 0.05  # Adam rate of the length covariate γ (length_control)
LENGTH_PREFIT_STEPS = 25  # Newton steps of γ's start: BT on the length difference alone
# Ridge per vote of that start: shrinks it (σ(3·d) votes give ~2.2), keeps it finite where
# length alone separates the votes, and leaves part of the length effect to the joint fit;
# with a ridge 50x weaker γ started near its full fit and r then over-corrected (corr(r,
# words) -0.29 / +0.13 / -0.25 over 3 seeds, PPO no better than the base on one).
LENGTH_PREFIT_RIDGE = 1e-2
LENGTH_PREFIT_MAX = 20.0  # |γ| cap of each Newton step (σ(20·d) is a step already)
# Weight of corr(r, answer tokens)² over each batch's answers: what γ·d cannot take up (a
# crowd that picks the longer answer whatever the margin) would otherwise go to r.
LENGTH_DECORRELATION = 1.0
# Scores of 2 x 256 answers pin the scale to a few per cent; scoring every training answer
# took as long as a third of the training itself.
NORM_SAMPLE_PAIRS = 256

Progress = Callable[[dict[str, Any]], None]


# --- the model ------------------------------------------------------------------------
class RewardModel(nn.Module):
    def __init__(self, trunk: nn.Module, hidden_size: int, token_sum: bool = True,
                 frozen_layers: int = 0, pooling: Pooling = "sum",
                 last_token: bool = True) -> None:
        super().__init__()
        self.trunk = trunk  # decoder without LM head, LoRA inside (peft), maybe cut short
        self.frozen_layers = frozen_layers  # bottom layers without LoRA (FrozenCache)
        self.pooling = pooling  # the token term: sum / TOKEN_SUM_SCALE, or mean
        self.last_token = last_token  # with the last-token term w·h_last + b
        # Standardised features (h − μ) / σ, μ and σ per dimension over the training answers'
        # tokens; only the probe (all layers frozen) sets them, else they stay 0 and 1.
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))
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

    def get_input_embeddings(self) -> nn.Module:
        """The trunk's token embedding. Named so that FSDP (learner/data_parallel.py) gives it
        a unit of its own: the training forward on cached states never runs it, so no step
        gathers it (in the root's unit it was gathered every step: 6× the DDP time)."""
        return self.trunk.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _layers(self) -> nn.ModuleList:
        return getattr(self.trunk, "get_base_model", lambda: self.trunk)().layers

    @property
    def is_probe(self) -> bool:
        """Every kept layer frozen: only the heads learn (module doc, "the probe")."""
        return self.frozen_layers >= len(self._layers())

    @torch.no_grad()
    def frozen_states(self, batch: PackedBatch) -> torch.Tensor:
        """The hidden states entering the first trainable layer, (B, P + T, d): the trunk's
        forward, stopped there by a pre-hook."""
        batch = batch.to(self.device)
        if self.is_probe:  # nothing trainable inside: the trunk's whole output
            with autocast(self.amp, self.device):
                return self._hidden(batch, None).float()
        captured: list[torch.Tensor] = []

        def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        hook = self._layers()[self.frozen_layers].register_forward_pre_hook(stop,
                                                                            with_kwargs=True)
        try:
            with autocast(self.amp, self.device):
                self.trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids)
        except _StopForward:
            pass
        finally:
            hook.remove()
        return captured[0].float()

    def _hidden(self, batch: PackedBatch, frozen: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states: the whole trunk, or with `frozen` (from `frozen_states`) the
        trainable top layers only, the frozen ones passed through."""
        if frozen is None:
            return self.trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).last_hidden_state
        if self.is_probe:
            return frozen.to(self.device)
        layers = self._layers()
        bottom = [layers[i] for i in range(self.frozen_layers)]
        for i in range(self.frozen_layers):
            layers[i] = _PassThrough()
        try:
            return self.trunk(inputs_embeds=frozen.to(self.device),
                              attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).last_hidden_state
        finally:
            for i, layer in enumerate(bottom):
                layers[i] = layer

    def terms(self, batch: PackedBatch, frozen: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two parts of r(x, y): the last-token term w·h_last + b, (B,), and the token
        sum's terms u·h_t / TOKEN_SUM_SCALE per answer token, (B, T) (None without it)."""
        batch = batch.to(self.device)
        with autocast(self.amp, self.device):
            hidden = self._hidden(batch, frozen)
        hidden = (hidden.float() - self.feature_mean) / self.feature_std
        rows = torch.arange(hidden.shape[0], device=self.device)
        last = self.head(hidden[rows, batch.last_index]).squeeze(-1)  # last real token
        if not self.last_token:
            last = torch.zeros_like(last)
        if self.token_head is None:
            return last, None
        per_token = self.token_head(hidden[:, batch.prompt_width:]).squeeze(-1)
        scale = (batch.response_lengths[:, None].float() if self.pooling == "mean"
                 else TOKEN_SUM_SCALE)
        return last, per_token * batch.response_mask / scale

    def forward(self, batch: PackedBatch, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """Raw reward r(x, y) of each row, shape (B,)."""
        last, tokens = self.terms(batch, frozen)
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


def head_penalty(model: RewardModel) -> torch.Tensor:
    """|w|² + |u|²: the probe's L2 (on standardised features it weighs every dimension
    alike)."""
    total = torch.zeros((), device=model.device)
    if model.last_token:
        total = total + model.head.weight.pow(2).sum()
    if model.token_head is not None:
        total = total + model.token_head.weight.pow(2).sum()
    return total


def _keep_layers(trunk: nn.Module, n: int) -> None:
    """Drop the decoder layers above the first `n` (the readout layer): never computed."""
    trunk.layers = trunk.layers[:n]
    trunk.config.num_hidden_layers = n
    if getattr(trunk.config, "layer_types", None):
        trunk.config.layer_types = trunk.config.layer_types[:n]


class _StopForward(Exception):
    """Raised by `frozen_states`' pre-hook: the rest of the forward is not needed."""


class _PassThrough(nn.Module):
    """Stands in for a frozen decoder layer whose output is already cached."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def build_reward_model(base_model: Path, preset: RewardPreset) -> tuple[RewardModel, Any]:
    """Base trunk (no LM head: the reward model never needs the vocabulary projection) with a
    fresh LoRA adapter and a fresh head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    trunk = AutoModel.from_pretrained(base_model, dtype=torch.float32)
    n_layers = min(preset.readout_layer or trunk.config.num_hidden_layers,
                   trunk.config.num_hidden_layers)
    _keep_layers(trunk, n_layers)
    if preset.lora_layers == 0:  # the probe: a frozen trunk, heads only
        trunk.requires_grad_(False)
        frozen = n_layers
    else:
        top = None if preset.lora_layers is None or preset.lora_layers >= n_layers else \
            list(range(n_layers - preset.lora_layers, n_layers))  # the trainable layers
        lora = LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                          target_modules=list(preset.lora_targets), bias="none",
                          layers_to_transform=top, layers_pattern="layers" if top else None)
        trunk = get_peft_model(trunk, lora)
        frozen = top[0] if top else 0
    model = RewardModel(trunk, trunk.config.hidden_size, token_sum=preset.token_sum,
                        frozen_layers=frozen, pooling=preset.pooling,
                        last_token=preset.last_token)
    if not preset.last_token:  # its term is replaced by 0: a weight nothing trains
        model.head.requires_grad_(False)
    device = pick_device()
    model.to(device).eval()  # dropout off, in training too
    model.amp = amp_dtype(preset.precision, device)
    return model, tokenizer


def save_reward_model(model: RewardModel, folder: Path) -> None:
    from safetensors.torch import save_file

    if not model.is_probe:  # the probe's trunk is the base, cut at the readout layer
        model.trunk.save_pretrained(folder, safe_serialization=True)
    tensors = {"weight": model.head.weight.detach().cpu().contiguous(),
               "bias": model.head.bias.detach().cpu().contiguous(),
               "reward_mean": model.reward_mean.reshape(1).cpu(),
               "reward_std": model.reward_std.reshape(1).cpu(),
               "feature_mean": model.feature_mean.cpu(), "feature_std": model.feature_std.cpu()}
    if model.token_head is not None:
        tensors["token_weight"] = model.token_head.weight.detach().cpu().contiguous()
    readout = {"layers": str(len(model._layers())), "pooling": model.pooling,
               "last_token": str(model.last_token).lower()}
    save_file(tensors, str(folder / REWARD_HEAD_FILE), metadata=readout)


def load_reward_model(folder: Path, base_model: Path,
                      precision: Precision = "auto") -> tuple[RewardModel, Any]:
    """A trained `rm-vN` for scoring (frozen)."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    with safe_open(str(folder / REWARD_HEAD_FILE), "pt") as f:
        readout = f.metadata() or {}  # none in reward models saved before the probe
    head = load_file(str(folder / REWARD_HEAD_FILE))
    trunk = AutoModel.from_pretrained(base_model, dtype=torch.float32)
    _keep_layers(trunk, int(readout.get("layers", trunk.config.num_hidden_layers)))
    probe = not (folder / "adapter_config.json").is_file()
    if not probe:
        trunk = PeftModel.from_pretrained(trunk, folder, is_trainable=False)
    model = RewardModel(trunk, trunk.config.hidden_size, token_sum="token_weight" in head,
                        frozen_layers=len(trunk.layers) if probe else 0,
                        pooling=readout.get("pooling", "sum"),  # type: ignore[arg-type]
                        last_token=readout.get("last_token", "true") == "true")
    with torch.no_grad():
        if "feature_mean" in head:
            model.feature_mean.copy_(head["feature_mean"])
            model.feature_std.copy_(head["feature_std"])
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


class FrozenCache:
    """The frozen layers' output for each side of each pair (module doc), real tokens only:
    a row's states do not depend on the padding around it (position ids come from the mask,
    padding is masked out), so they are cut out once and put back in any later batch."""

    def __init__(self, model: RewardModel, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(pair) -> (a, b)

    def fill(self, pairs: list[Pair], batch_size: int,
             progress: Callable[[int], None] | None = None) -> None:
        todo = [p for p in pairs if id(p) not in self.states]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = pair_batch(chunk, self.pad_id)
            hidden = self.model.frozen_states(batch).cpu()
            real = batch.attention_mask.bool()
            rows = [hidden[r, real[r]] for r in range(2 * len(chunk))]
            for i, pair in enumerate(chunk):
                self.states[id(pair)] = (rows[i], rows[len(chunk) + i])
            if progress is not None:
                progress(start + len(chunk))

    def assemble(self, pairs: list[Pair], batch: PackedBatch) -> torch.Tensor:
        """The cached states laid out like `batch` (= pair_batch(pairs)), zeros on padding."""
        rows = [self.states[id(p)][0] for p in pairs] + [self.states[id(p)][1] for p in pairs]
        frozen = torch.zeros(*batch.input_ids.shape, rows[0].shape[-1])
        real = batch.attention_mask.bool()
        for r, states in enumerate(rows):
            frozen[r, real[r]] = states
        return frozen


# --- the loss ------------------------------------------------------------------------------
def bradley_terry_loss(delta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−[t·log σ(Δ) + (1 − t)·log σ(−Δ)] per pair; t = 1 gives −log σ(r_w − r_l)."""
    return -(target * F.logsigmoid(delta) + (1 - target) * F.logsigmoid(-delta))


def pair_rewards(model: RewardModel, pairs: list[Pair], pad_id: int,
                 cache: FrozenCache | None = None) -> torch.Tensor:
    """r of rows a_1..a_n, b_1..b_n; from the cached frozen layers when `cache` is given."""
    batch = pair_batch(pairs, pad_id)
    return model(batch, cache.assemble(pairs, batch) if cache is not None else None)


def pair_deltas(model: RewardModel, pairs: list[Pair], pad_id: int,
                cache: FrozenCache | None = None) -> torch.Tensor:
    rewards = pair_rewards(model, pairs, pad_id, cache)
    return rewards[: len(pairs)] - rewards[len(pairs):]  # Δ = r_a − r_b


def length_difference(pairs: list[Pair], device: torch.device) -> torch.Tensor:
    """d = (n_a − n_b) / (n_a + n_b) per pair, n = answer tokens (0 when both are empty)."""
    n_a = torch.tensor([len(p.answer_a) for p in pairs], dtype=torch.float32, device=device)
    n_b = torch.tensor([len(p.answer_b) for p in pairs], dtype=torch.float32, device=device)
    return (n_a - n_b) / (n_a + n_b).clamp(min=1.0)


def answer_lengths(pairs: list[Pair], device: torch.device) -> torch.Tensor:
    """Answer tokens of rows a_1..a_n, b_1..b_n."""
    return torch.tensor([len(p.answer_a) for p in pairs] + [len(p.answer_b) for p in pairs],
                        dtype=torch.float32, device=device)


def length_correlation(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of r (rows a_1..a_n, b_1..b_n) with the answers' token counts."""
    r, n = rewards - rewards.mean(), lengths - lengths.mean()
    return (r * n).sum() / (r.norm() * n.norm()).clamp(min=NORM_EPS)


def fit_length_weight(pairs: list[Pair]) -> float:
    """γ of P(a ≻ b) = σ(γ·d) fitted to the votes (Newton, shrunk by a ridge): how much
    length alone explains, where γ starts so that r is not first taught the length
    preference while γ catches up at Adam's pace."""
    d = length_difference(pairs, torch.device("cpu")).double()
    t = torch.tensor([p.target for p in pairs], dtype=torch.float64)
    gamma = 0.0
    for _ in range(LENGTH_PREFIT_STEPS):
        p = torch.sigmoid(gamma * d)
        grad = ((p - t) * d).mean().item() + LENGTH_PREFIT_RIDGE * gamma
        hess = (p * (1 - p) * d * d).mean().item() + LENGTH_PREFIT_RIDGE
        gamma = max(-LENGTH_PREFIT_MAX, min(LENGTH_PREFIT_MAX, gamma - grad / hess))
    return gamma


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
def evaluate_pairs(model: RewardModel, pairs: list[Pair], pad_id: int, batch_size: int,
                   cache: FrozenCache | None = None,
                   parallel: DataParallel = SINGLE) -> dict[str, float | None]:
    """Metrics over `pairs`; data-parallel, each rank scores its share (the pairs it holds)
    and the figures are those of all the ranks' pairs together."""
    deltas = [pair_deltas(model, pairs[i:i + batch_size], pad_id, cache)
              for i in range(0, len(pairs), batch_size)]
    scored = parallel.gather([(d, p.target) for d, p in zip(
        torch.cat(deltas).tolist() if deltas else [], pairs, strict=True)])
    if not scored:
        return {"accuracy": None, "calibration": None, "loss": None, "n": 0}
    return pair_metrics(torch.tensor([d for d, _ in scored]),
                        torch.tensor([t for _, t in scored]))


# --- training ------------------------------------------------------------------------------
def rank_share(batch: list[Any], mine: set[int], spare: Any, world: int
               ) -> tuple[list[Any], float]:
    """This rank's part of a batch every rank draws alike, and the weight of its summed loss.

    The pairs of the batch it holds (`mine`: their ids), the loss summed over them × world
    / |batch|: DDP averages the ranks' gradients (÷ world), so the result is the gradient of
    the whole batch's mean loss, however unevenly the batch falls. A rank that holds none of
    it runs one pair of its own (`spare`) at weight 0: every rank must run the forward and
    backward that DDP waits for."""
    own = [item for item in batch if id(item) in mine]
    return (own, world / len(batch)) if own else ([spare], 0.0)


@dataclass
class RewardTrainResult:
    model: RewardModel
    tokenizer: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_reward_model(votes: list[VoteRecord], base_model: Path, preset: RewardPreset,
                       progress: Progress | None = None,
                       parallel: DataParallel = SINGLE) -> RewardTrainResult:
    """Train on the votes. Data-parallel (`parallel`, learner/data_parallel.py): every rank
    holds the same pairs and draws the same batches; each pair belongs to one rank, which
    alone caches and scores it, and each rank's loss is weighted so that DDP's average of
    the gradients is the one-process gradient of the whole batch. Only the length control's
    decorrelation term is taken over each rank's share of a batch, not the whole batch."""
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
    if len(train) < parallel.world:
        raise ValueError(f"{len(train)} trainable votes, fewer than the {parallel.world} "
                         "training processes")
    my_train, my_held_out = parallel.shard(train), parallel.shard(held_out)
    mine = {id(p) for p in my_train}

    # 2. The frozen layers' output of every answer this rank holds, once (module doc).
    cache = FrozenCache(model, pad_id)
    n_cached = len(my_train) + len(my_held_out)
    started = time.monotonic()

    def cached(done: int) -> None:
        if progress is not None:
            elapsed = time.monotonic() - started
            progress({"phase": "reward_model", "stage": "frozen layers", "step": 0,
                      "total": preset.epochs * math.ceil(len(train) / preset.batch_size),
                      "cached": done, "of": n_cached,
                      "eta_s": elapsed / done * (n_cached - done)})

    cache.fill(my_train + my_held_out, preset.batch_size, cached)
    log.info("reward model: frozen layers (%d of %d) cached for %d pairs in %.0f s",
             model.frozen_layers, len(model._layers()), n_cached, time.monotonic() - started)

    if model.is_probe:  # standardise on the training answers' tokens (of every rank)
        answers = [side[-len(answer):].double() for p in my_train for side, answer in
                   zip(cache.states[id(p)], (p.answer_a, p.answer_b), strict=True)]
        n = parallel.total(torch.tensor(float(sum(len(a) for a in answers)),
                                        dtype=torch.float64))
        mean = parallel.total(sum(a.sum(0) for a in answers)) / n
        # Σ(x − μ)², summed over the ranks: two passes in float64, whatever the split.
        squares = parallel.total(sum((a - mean).pow(2).sum(0) for a in answers))
        model.feature_mean.copy_(mean.float())
        model.feature_std.copy_((squares / (n - 1)).sqrt().float().clamp(min=NORM_EPS))

    forward = parallel.prepare(model)  # DDP/FSDP for the training forward (itself if 1)
    params = [p for p in forward.parameters() if p.requires_grad]  # LoRA + heads
    # The heads start from (near) zero and are a few hundred weights: at the LoRA's rate
    # they would barely move in one pass over a few hundred votes.
    heads = {id(p) for name, p in forward.named_parameters()
             if name.removeprefix("module.").startswith(("head.", "token_head."))}
    # γ of the length covariate (module doc): kept outside the model, as scoring never uses
    # it; one scalar, so it gets its own fixed rate (Adam moves it about that much a step).
    length_weight = torch.tensor(fit_length_weight(train) if preset.length_control else 0.0,
                                 device=model.device, requires_grad=preset.length_control)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if id(p) not in heads], "lr": preset.lr},
         {"params": [p for p in params if id(p) in heads], "lr": preset.head_lr or preset.lr},
         {"params": [length_weight] if preset.length_control else [], "lr": LENGTH_WEIGHT_LR,
          "weight_decay": 0.0}],
        weight_decay=preset.weight_decay)
    steps_per_epoch = math.ceil(len(train) / preset.batch_size)
    total = preset.epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    step, steps_started = 0, time.monotonic()
    grad_spread: float | None = 0.0  # None when sharded: one copy of each gradient entry

    # 3. Epochs over shuffled pairs: BT loss on Δ = r_a − r_b (top layers only).
    for epoch in range(preset.epochs):
        rng.shuffle(train)  # the same order on every rank (same seed)
        epoch_loss = 0.0
        for start in range(0, len(train), preset.batch_size):
            batch = train[start:start + preset.batch_size]
            chunk, share = rank_share(batch, mine, my_train[0], parallel.world)
            own = share > 0
            targets = torch.tensor([p.target for p in chunk], device=model.device)
            rewards = pair_rewards(forward, chunk, pad_id, cache)
            deltas = rewards[: len(chunk)] - rewards[len(chunk):]  # Δ = r_a − r_b
            if preset.length_control:
                deltas = deltas + length_weight * length_difference(chunk, model.device)
            bt_loss = bradley_terry_loss(deltas, targets).sum() * share
            loss = bt_loss
            if preset.length_control:
                loss = loss + (LENGTH_DECORRELATION if own else 0.0) * length_correlation(
                    rewards, answer_lengths(chunk, model.device)) ** 2
            if preset.head_l2:
                loss = loss + preset.head_l2 * head_penalty(model)
            optimizer.zero_grad()
            loss.backward()  # DDP: the gradients are now the ranks' average
            parallel.average_gradients([length_weight] if preset.length_control else [])
            if start == 0:  # once an epoch: every rank about to take the same step?
                spread = parallel.gradient_spread(params)
                grad_spread = None if spread is None else max(grad_spread or 0.0, spread)
            torch.nn.utils.clip_grad_norm_(params, preset.max_grad_norm)
            optimizer.step()
            step += 1
            # The whole batch's loss: its BT part summed over the ranks, the rest as is.
            # (each rank's BT part is its share of the batch's mean, times the world size:
            # their mean over the ranks is the batch's; the penalties are the same on all)
            step_loss = loss.item() - bt_loss.item() + parallel.mean(bt_loss.item())
            epoch_loss += step_loss * len(batch)
            if progress is not None:
                elapsed = time.monotonic() - steps_started
                progress({"phase": "reward_model", "step": step, "total": total,
                          "loss": step_loss, "eta_s": elapsed / step * (total - step)})
            if preset.eval_every_steps and step % preset.eval_every_steps == 0 and step < total:
                with parallel.whole(model):
                    held = evaluate_pairs(model, my_held_out, pad_id, preset.batch_size, cache,
                                          parallel)
                history.append({"step": step, "epoch": step / steps_per_epoch,
                                "train_loss": step_loss, "heldout_accuracy": held["accuracy"],
                                "heldout_calibration": held["calibration"],
                                "heldout_loss": held["loss"]})
        with parallel.whole(model):
            held = evaluate_pairs(model, my_held_out, pad_id, preset.batch_size, cache, parallel)
        history.append({"step": step, "epoch": epoch + 1, "train_loss": epoch_loss / len(train),
                        "heldout_accuracy": held["accuracy"],
                        "heldout_calibration": held["calibration"],
                        "heldout_loss": held["loss"]})
        log.info("reward model: epoch %d/%d, train loss %.4f, held-out accuracy %s",
                 epoch + 1, preset.epochs, epoch_loss / len(train), held["accuracy"])

    # 4. Normalisation: mean and std of the raw scores of (a random sample of at most
    #    NORM_SAMPLE_PAIRS) training pairs; the same pass gives the training accuracy. The
    #    held-out figures are those after the last step.
    sample = random.Random(preset.seed).sample(train, min(len(train), NORM_SAMPLE_PAIRS))
    my_sample = [p for p in sample if id(p) in mine]
    with torch.no_grad(), parallel.whole(model):
        scored = [pair_rewards(model, my_sample[i:i + preset.batch_size], pad_id, cache)
                  .split(len(my_sample[i:i + preset.batch_size]))
                  for i in range(0, len(my_sample), preset.batch_size)]
        rows = parallel.gather(list(zip(
            torch.cat([a for a, _ in scored]).tolist() if scored else [],
            torch.cat([b for _, b in scored]).tolist() if scored else [],
            [p.target for p in my_sample], [len(p.answer_a) for p in my_sample],
            [len(p.answer_b) for p in my_sample], strict=True)))
        r_a, r_b, targets, n_a, n_b = (torch.tensor(column, device=model.device)
                                       for column in zip(*rows, strict=True))
        raw = torch.cat([r_a, r_b])
        model.reward_mean.copy_(raw.mean())
        model.reward_std.copy_(raw.std().clamp(min=NORM_EPS))
        train_eval = pair_metrics(r_a - r_b, targets)
        # What r pays for length alone (length control aims at ~0; a plain RM on a crowd
        # that likes long answers shows it): r against answer tokens on the same sample.
        length_corr = length_correlation(raw, torch.cat([n_a, n_b]).float()).item()
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
        "length_weight": length_weight.item() if preset.length_control else None,
        "reward_length_corr": length_corr, "processes": parallel.world,
        "grad_spread": grad_spread,
    }
    # Under FSDP rank 0 saves it alone: whole weights.
    model = parallel.unsharded(model, lambda: build_reward_model(base_model, preset)[0])
    model.requires_grad_(False)
    return RewardTrainResult(model, tokenizer, metrics, history)
