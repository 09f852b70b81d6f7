"""Sanity figures of a new policy and its parent, for the loop's sanity gate
(deploy/decision.py `sanity_failures`): both answer the same fixed prompts (the first
SANITY_PROMPTS of learner/data/prompts.txt), sampled as users see them served (temperature
SANITY_TEMPERATURE) with the same seed for both, so the two sets differ by the policy, not by
the draws; greedy answers would judge a mode users never see (a small model's greedy answer
loops where its sampled ones do not). Up to the preset's max_new_tokens, and each set of
answers is summarised by `answer_stats`:

    empty_share     share of answers that are empty (whitespace only)
    cut_off_share   share that hit max_new_tokens without an EOS
    repetition      share of word 3-grams that repeat an earlier 3-gram of the same answer
                    (pooled over the answers)
    mean_length     mean answer length in characters

run_policy stores them as metrics["sanity"] = {...new policy..., "parent": {...}}, and the
base's under "base" when the parent is not the base.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from learner.presets import PPOPreset, Precision

SANITY_PROMPTS = 32  # at 16, one run's 7 → 12 cut-off answers refused a candidate
SANITY_TEMPERATURE = 0.8  # the serving default the crowd's answers are drawn at
SANITY_SEED = 0
PARENT_ADAPTER = "sanity-parent"  # name the parent's adapter is loaded under, briefly


def repeated_trigrams(answer: str) -> tuple[int, int]:
    """(word 3-grams of the answer, those that repeat an earlier 3-gram of it)."""
    words = answer.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams), len(grams) - len(set(grams))


def repetition_share(answer: str) -> float:
    """One answer's `repetition` (0 for answers under three words)."""
    total, repeated = repeated_trigrams(answer)
    return repeated / total if total else 0.0


def answer_stats(answers: list[str], cut_off: list[bool]) -> dict[str, float]:
    """The figures above for one set of answers; `cut_off[i]`: answer i ended without EOS."""
    if not answers or len(answers) != len(cut_off):
        raise ValueError("need one cut_off flag per answer, and at least one answer")
    n = len(answers)
    grams_total = grams_repeated = 0
    for answer in answers:
        total, repeated = repeated_trigrams(answer)
        grams_total += total
        grams_repeated += repeated
    return {
        "answers": n,
        "empty_share": sum(1 for a in answers if not a.strip()) / n,
        "cut_off_share": sum(1 for c in cut_off if c) / n,
        "repetition": grams_repeated / grams_total if grams_total else 0.0,
        "mean_length": sum(len(a) for a in answers) / n,
    }


def sanity_prompts(n: int = SANITY_PROMPTS) -> list[str]:
    from learner.prompt_pool import load_shipped_prompts

    return load_shipped_prompts()[:n]


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                     max_prompt_tokens: int, precision: Precision = "fp32",
                     temperature: float = SANITY_TEMPERATURE, seed: int = SANITY_SEED
                     ) -> tuple[list[str], list[bool]]:
    """Sampled answers (greedy at temperature 0) of `model` (as it is now: adapter on or off)
    to single-turn prompts, and whether each was cut off (no EOS within max_new_tokens). The
    draws come from their own generator state seeded with `seed`: the caller's is untouched."""
    import torch

    from learner.precision import amp_dtype, autocast
    from learner.prompt_pool import as_messages
    from learner.sequences import cut_at_eos, encode_prompt

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [encode_prompt(tokenizer, as_messages(p), max_prompt_tokens) for p in prompts]
    width = max(len(p) for p in ids)
    device = model.get_base_model().get_output_embeddings().weight.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids],
                             device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), autocast(amp_dtype(precision, device), device), \
            torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention, **sampling,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    answers, cut_off = [], []
    for row in out:
        tokens = cut_at_eos(row[width:].tolist(), eos)
        ended = bool(tokens) and tokens[-1] == eos
        cut_off.append(not ended)
        answers.append(tokenizer.decode(tokens[:-1] if ended else tokens,
                                        skip_special_tokens=True))
    return answers, cut_off


@contextmanager
def parent_policy(model: Any, parent_adapter: Path | None) -> Iterator[None]:
    """Make the peft `model` answer as the parent: the base (adapter disabled), or the
    parent's adapter loaded beside the trained one; restored (and unloaded) afterwards so
    the trained adapter alone is saved."""
    if parent_adapter is None:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.load_adapter(str(parent_adapter), adapter_name=PARENT_ADAPTER)
    try:
        model.set_adapter(PARENT_ADAPTER)
        yield
    finally:
        model.set_adapter(active)
        model.delete_adapter(PARENT_ADAPTER)


def policy_sanity(model: Any, tokenizer: Any, parent_adapter: Path | None,
                  preset: PPOPreset, prompts: list[str] | None = None) -> dict[str, Any]:
    """metrics["sanity"] of a trained policy: its figures, and its parent's under "parent"."""
    prompts = sanity_prompts() if prompts is None else prompts
    args = (tokenizer, prompts, preset.max_new_tokens, preset.max_prompt_tokens,
            preset.precision)
    new = answer_stats(*generate_answers(model, *args))
    with parent_policy(model, parent_adapter):
        parent = answer_stats(*generate_answers(model, *args))
    if parent_adapter is None:
        return {**new, "parent": parent}
    with parent_policy(model, None):  # the base too, the gate's floor (deploy/decision.py)
        base = answer_stats(*generate_answers(model, *args))
    return {**new, "parent": parent, "base": base}
