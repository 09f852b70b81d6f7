"""Token layout shared by the reward model and PPO, so both see answers the same way.

A batch of (prompt, response) pairs is packed as

    [pad pad p p p p | r r r eos pad pad]
     ^ prompt block, left-padded  ^ response block, right-padded

so every response starts at the same column `P` (the prompt width) and per-token tensors of
the response are plain (B, T) tensors. Position ids are `cumsum(attention_mask) − 1`: the
first real token is position 0 whatever the padding (the padding carries no position).
The reward is read at the last real response token, column `P + len(response) − 1`
(SmolLM2's pad id equals its eos id, so padding is found from lengths, never from ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Message = dict[str, str]


def encode_prompt(tokenizer: Any, messages: list[Message], max_tokens: int) -> list[int]:
    """The chat template with the assistant turn opened; long conversations are cut from
    the left (the newest turns matter most)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:]


def encode_answer(tokenizer: Any, answer: str, max_tokens: int) -> list[int]:
    """An answer as the policy would have generated it: its tokens, then eos (<|im_end|>);
    an answer longer than `max_tokens` is cut and has no eos, like a cut-off generation."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) >= max_tokens:
        return ids[:max_tokens]
    return ids + [tokenizer.eos_token_id]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T) float: 1 on real response tokens
    prompt_width: int  # P
    response_lengths: torch.Tensor  # (B,)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def last_index(self) -> torch.Tensor:
        """Column of the last real response token of each row (where the reward is read)."""
        return self.prompt_width + self.response_lengths - 1

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.position_ids.to(device), self.response_mask.to(device),
                           self.prompt_width, self.response_lengths.to(device))

    def select(self, rows: torch.Tensor) -> PackedBatch:
        return PackedBatch(self.input_ids[rows], self.attention_mask[rows],
                           self.position_ids[rows], self.response_mask[rows],
                           self.prompt_width, self.response_lengths[rows])


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    if len(prompts) != len(responses):
        raise ValueError("one response per prompt")
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty response: every answer has at least one token (eos)")
    width = max(len(p) for p in prompts)
    length = max(len(r) for r in responses)
    rows, masks = [], []
    for p, r in zip(prompts, responses, strict=True):
        left, right = width - len(p), length - len(r)
        rows.append([pad_id] * left + p + r + [pad_id] * right)
        masks.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(masks, dtype=torch.long)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    response_mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    return PackedBatch(input_ids, attention_mask, position_ids, response_mask, width, lengths)


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """A generated answer up to and including its first eos."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
