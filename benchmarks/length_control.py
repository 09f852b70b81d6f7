"""Does reward-model length control keep PPO from winning by length alone? (issue 14)

Offline, on the tiny model, with answers whose length varies (2 to 14 words). The crowd
prefers content first (an answer with " banana" beats one without) and, where the content
ties, the longer answer (LENGTH_SWAY of the time): length sways it, content decides it. The
reward model is trained on those votes twice, plain and with the length covariate
(`RewardPreset.length_control`: P(a ≻ b) = σ(r_a − r_b + γ·d), PPO gets r alone), then PPO
runs from the same SFT'd base with each. Printed beside the base's figures in the same run:

- per reward model: γ; on fresh answer pairs, how often r ranks the answer with banana above
  a *longer* one without (content against length; the content judge says banana, always),
  and the correlation of r with the answer's words among answers without banana (what the
  RM pays for length alone);
- per policy: mean answer length in tokens, the share that says banana (what the content
  judge prefers) and the share cut off at the length cap.

    .venv/bin/python benchmarks/length_control.py [--seeds 3]

~2 min per seed on 2 cores; run alone.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedback.vote_record import VoteRecord
from learner.policy_trainer import load_policy, save_adapter, train_policy
from learner.presets import get_preset
from learner.prompt_pool import PromptPool, load_shipped_prompts
from learner.reward_model import RewardTrainResult, train_reward_model
from learner.rollout import TransformersRollout
from learner.sequences import encode_answer, encode_prompt, pack
from testkit.hidden_rule_votes import random_answer, sft_tiny_base
from testkit.tiny_model import build_tiny_model

MIN_WORDS, MAX_WORDS = 2, 14  # answer lengths vary, so length can pay
MARKER_SHARE = 0.3  # answers with banana among the voted ones
LENGTH_SWAY = 0.9  # where the content ties, the crowd picks the longer answer this often
N_VOTES = 600
N_PROBE_PAIRS = 400  # fresh pairs for the reward models' diagnostics
MAX_NEW_TOKENS = 32  # room for the policy to grow its answers (the SFT base writes ~4-20)
EVAL_PROMPTS = 64
EVAL_SEEDS = (100, 101)
BANANA = re.compile(r"\bbanana", flags=re.IGNORECASE)


def words(text: str) -> int:
    return len(text.split())


def crowd_winner(answer_a: str, answer_b: str, rng: random.Random, swayed: bool) -> str:
    """Content first: banana wins. Between equals the swayed crowd picks the longer, mostly;
    the content-only crowd calls a tie."""
    banana_a, banana_b = bool(BANANA.search(answer_a)), bool(BANANA.search(answer_b))
    if banana_a != banana_b:
        return "a" if banana_a else "b"
    if not swayed or words(answer_a) == words(answer_b):
        return "tie"
    longer = "a" if words(answer_a) > words(answer_b) else "b"
    return longer if rng.random() < LENGTH_SWAY else {"a": "b", "b": "a"}[longer]


def crowd_votes(prompts: list[str], seed: int, swayed: bool) -> list[VoteRecord]:
    rng = random.Random(seed)
    votes = []
    for i in range(N_VOTES):
        conversation = [{"role": "user", "content": rng.choice(prompts)}]
        a, b = (random_answer(rng, rng.random() < MARKER_SHARE, MIN_WORDS, MAX_WORDS)
                for _ in range(2))
        votes.append(VoteRecord(
            battle_id=f"lc-{seed}-{i}", model_a="base", model_b="base",
            winner=crowd_winner(a, b, rng, swayed),  # type: ignore[arg-type]
            conversation_a=conversation, conversation_b=conversation, answer_a=a, answer_b=b,
            session=f"s{i % 20}", battle_created_at=1.7e9 + i, voted_at=1.7e9 + i + 5))
    return votes


def reward_scores(reward: RewardTrainResult, prompts: list[str], answers: list[str]
                  ) -> np.ndarray:
    tokenizer = reward.tokenizer
    prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}], 96) for p in prompts]
    answer_ids = [encode_answer(tokenizer, a, 32) for a in answers]
    with torch.no_grad():
        return reward.model.score(pack(prompt_ids, answer_ids, tokenizer.pad_token_id)).numpy()


def probe_reward(reward: RewardTrainResult, prompts: list[str], seed: int) -> dict[str, float]:
    """Content against length: banana in a shorter answer vs a longer one without; and r's
    correlation with words among answers without banana."""
    rng = random.Random(seed)
    shown, short_banana, long_plain, plain = [], [], [], []
    while len(short_banana) < N_PROBE_PAIRS:
        banana = random_answer(rng, True, MIN_WORDS, MAX_WORDS - 4)
        other = random_answer(rng, False, words(banana) + 2, MAX_WORDS)
        shown.append(rng.choice(prompts))
        short_banana.append(banana)
        long_plain.append(other)
        plain.append(random_answer(rng, False, MIN_WORDS, MAX_WORDS))
    r_banana = reward_scores(reward, shown, short_banana)
    r_long = reward_scores(reward, shown, long_plain)
    r_plain = reward_scores(reward, shown, plain)
    return {"content_over_length": float(np.mean(r_banana > r_long)),
            "corr_r_words": float(np.corrcoef(r_plain, [words(a) for a in plain])[0, 1])}


def measure_policy(sft: Path, adapter: Path | None, prompts: list[str]) -> dict[str, float]:
    """Mean answer tokens, banana share and cut-off share of sampled answers."""
    preset = replace(get_preset("tiny").ppo, max_new_tokens=MAX_NEW_TOKENS)
    model, _, tokenizer = load_policy(sft, preset, adapter)
    rollout = TransformersRollout(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  preset.max_new_tokens, preset.temperature)
    prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}],
                                preset.max_prompt_tokens) for p in prompts]
    lengths, banana, cut = [], [], []
    for seed in EVAL_SEEDS:
        for answer in rollout.generate(model, prompt_ids, seed=seed):
            ended = bool(answer) and answer[-1] == tokenizer.eos_token_id
            lengths.append(len(answer) - ended)
            cut.append(not ended)
            banana.append(bool(BANANA.search(tokenizer.decode(answer, skip_special_tokens=True))))
    return {"tokens": float(np.mean(lengths)), "banana": float(np.mean(banana)),
            "cut": float(np.mean(cut))}


def policy_row(name: str, m: dict[str, float]) -> str:
    return (f"  {name:<40} tokens {m['tokens']:5.1f}   banana {m['banana']:.2f}   "
            f"cut off {m['cut']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    tiny = get_preset("tiny")
    # (the crowd the RM learns from, its preset): the length-swayed crowd with a plain and a
    # length-controlled RM, and for reference a crowd that judges content only
    reward_presets = {"plain": (True, tiny.reward),
                      "length-controlled": (True, replace(tiny.reward, length_control=True)),
                      "content-only crowd": (False, tiny.reward)}
    prompts = load_shipped_prompts()
    train_prompts, eval_prompts = prompts[:-EVAL_PROMPTS], prompts[-EVAL_PROMPTS:]
    summary: dict[str, list[dict[str, float]]] = {name: [] for name in ["base", *reward_presets]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "tiny")
        sft = sft_tiny_base(base, root / "sft", train_prompts, min_words=MIN_WORDS,
                            max_words=MAX_WORDS)
        summary["base"].append(measure_policy(sft, None, eval_prompts))
        print(policy_row("base (SFT)", summary["base"][0]), flush=True)
        for seed in range(args.seeds):
            for name, (swayed, reward_preset) in reward_presets.items():
                votes = crowd_votes(train_prompts, seed, swayed)
                reward = train_reward_model(votes, base, replace(reward_preset, seed=seed))
                probe = probe_reward(reward, eval_prompts, seed=1000 + seed)
                gamma = reward.metrics["length_weight"]
                print(f"seed {seed} RM {name:<18} held-out vs its crowd "
                      f"{reward.metrics['heldout_accuracy']:.2f}"
                      f"   γ {'—' if gamma is None else f'{gamma:+.2f}'}   banana-short over "
                      f"long-plain {probe['content_over_length']:.2f}   corr(r, words) "
                      f"{probe['corr_r_words']:+.2f}", flush=True)
                ppo = replace(tiny.ppo, seed=seed, max_new_tokens=MAX_NEW_TOKENS)
                result = train_policy(
                    sft, ppo, reward.model.score, PromptPool(),
                    lambda tok, p=ppo: TransformersRollout(
                        tok.eos_token_id, tok.pad_token_id, p.max_new_tokens, p.temperature))
                adapter = root / f"seed{seed}-{name}"
                save_adapter(result.model, result.value_head, adapter)
                row = measure_policy(sft, adapter, eval_prompts) | probe
                summary[name].append(row)
                print(policy_row(f"PPO on the {name} RM", row), flush=True)
    print("\nmean over seeds (base: one SFT model)")
    for name, rows in summary.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        extra = (f"   RM banana-short over long-plain {mean['content_over_length']:.2f}, "
                 f"corr(r, words) {mean['corr_r_words']:+.2f}" if name != "base" else "")
        print(policy_row(name, mean) + extra)
    base_tokens = summary["base"][0]["tokens"]
    for name in reward_presets:
        tokens = np.mean([r["tokens"] for r in summary[name]])
        print(f"length ratio PPO on the {name} RM / base: {tokens / base_tokens:.2f}")


if __name__ == "__main__":
    main()
