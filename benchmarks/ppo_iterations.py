"""Does PPO keep improving the policy iteration after iteration? (issue 11's policy link)

Offline, on the tiny model: the SFT'd tiny base (testkit.hidden_rule_votes, writes " banana" in
about a fifth of its answers), a reward model trained on votes of the hidden rule "the answer
with banana wins", then PPO iterations each starting from the previous adapter, as the loop
does (KL always against the frozen base). Printed per version: the share of sampled answers
that say banana (what the crowd prefers) and the RM's mean score on banana / other answers (is
the RM still separating them?), beside the base's in the same run.

    .venv/bin/python benchmarks/ppo_iterations.py --seeds 3 --iterations 2
    .venv/bin/python benchmarks/ppo_iterations.py --kl-coef 0.05 --steps 20
    .venv/bin/python benchmarks/ppo_iterations.py --kl-target-from-parent 3 --kl-horizon 20
    .venv/bin/python benchmarks/ppo_iterations.py --votes crowd --iterations 1 --seeds 4

`--votes crowd` trains each seed's reward model on votes as the live loop test gets them: two
sampled answers of the SFT base per battle (a self-pair, at the battle length), judged by
"banana wins, neither or both a tie, a tenth flipped" — a third of them decisive, where the
hidden-rule votes are nearly all decisive.

~1 min per iteration and seed on 2 cores; run alone.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from core.settings import Settings
from crowd.judges import get_judge
from feedback.vote_record import VoteRecord
from learner.policy_trainer import load_policy, save_adapter, train_policy
from learner.presets import get_preset
from learner.prompt_pool import PromptPool, load_shipped_prompts
from learner.reward_model import train_reward_model
from learner.rollout import TransformersRollout
from learner.sequences import encode_prompt, pack
from testkit.hidden_rule_votes import hidden_rule_votes, sft_tiny_base
from testkit.tiny_model import build_tiny_model

N_VOTES = 300
EVAL_PROMPTS = 64  # the last prompts of the shipped set, two sampled answers each
EVAL_SEEDS = (100, 101)
BANANA = re.compile(r"\bbanana", flags=re.IGNORECASE)
BATTLE_MAX_TOKENS = 16  # the loop test's battle length
# The loop test's judge, loaded by name as the test loads it (from the tests folder).
LOOP_TEST_JUDGE = "crowd_judges_example:prefers_banana_noisy"
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


def crowd_votes(sft: Path, prompts: list[str], n: int, seed: int) -> list[VoteRecord]:
    """`n` votes on self-pairs of the SFT base, as the live loop's first iteration sees them."""
    preset = get_preset("tiny").ppo
    model, _, tokenizer = load_policy(sft, preset, None)
    rollout = TransformersRollout(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  BATTLE_MAX_TOKENS,
                                  Settings.model_fields["battle_temperature"].default)
    sys.path.insert(0, str(TESTS_DIR))
    rng, judge = random.Random(seed), get_judge(LOOP_TEST_JUDGE)
    chosen = [rng.choice(prompts) for _ in range(n)]
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}], preset.max_prompt_tokens)
           for p in chosen]
    answers = [tokenizer.decode(a, skip_special_tokens=True)
               for a in rollout.generate(model, ids + ids, seed=seed)]
    votes = []
    for i, prompt in enumerate(chosen):
        conversation = [{"role": "user", "content": prompt}]
        answer_a, answer_b = answers[i], answers[n + i]
        votes.append(VoteRecord(
            battle_id=str(uuid.UUID(int=rng.getrandbits(128))), model_a="base",
            model_b="base", winner=judge(conversation, answer_a, answer_b, rng),
            conversation_a=conversation, conversation_b=conversation, answer_a=answer_a,
            answer_b=answer_b, session=f"s{i % 8}", battle_created_at=1.7e9 + i,
            voted_at=1.7e9 + i + 0.5))
    return votes


def measure(sft: Path, adapter: Path | None, reward, prompts: list[str]) -> dict[str, float]:
    """Banana share of sampled answers, and the RM's mean score on banana / other answers."""
    preset = get_preset("tiny").ppo
    model, _, tokenizer = load_policy(sft, preset, adapter)
    rollout = TransformersRollout(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  preset.max_new_tokens, preset.temperature)
    prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}],
                                preset.max_prompt_tokens) for p in prompts]
    has, scores = [], []
    for seed in EVAL_SEEDS:
        answers = rollout.generate(model, prompt_ids, seed=seed)
        with torch.no_grad():
            scores += reward.model.score(pack(prompt_ids, [list(a) for a in answers],
                                              tokenizer.pad_token_id)).tolist()
        has += [bool(BANANA.search(tokenizer.decode(a, skip_special_tokens=True)))
                for a in answers]
    on = [s for s, h in zip(scores, has, strict=True) if h]
    off = [s for s, h in zip(scores, has, strict=True) if not h]
    return {"banana": sum(has) / len(has),
            "rm_banana": sum(on) / max(len(on), 1), "rm_other": sum(off) / max(len(off), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--kl-coef", type=float, default=None, help="default: the tiny preset's")
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    parser.add_argument("--lr", type=float, default=None, help="default: the tiny preset's")
    parser.add_argument("--rollout-batch", type=int, default=None,
                        help="answers per PPO step; default: the tiny preset's")
    parser.add_argument("--kl-target-from-parent", type=float, default=None, metavar="NATS",
                        help="adaptive β whose target is the parent's KL + NATS, continued "
                             "from the parent's final β (as the cpu preset does)")
    parser.add_argument("--kl-horizon", type=int, default=None, help="adaptive β's horizon")
    parser.add_argument("--votes", choices=("hidden-rule", "crowd"), default="hidden-rule",
                        help="the RM's votes: the hidden rule's (one RM for all seeds) or "
                             "the crowd's on the SFT base's own answers (one RM per seed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    tiny = get_preset("tiny")
    overrides = {k: v for k, v in (("kl_coef", args.kl_coef), ("steps", args.steps),
                                   ("lr", args.lr), ("kl_horizon", args.kl_horizon),
                                   ("rollout_batch", args.rollout_batch))
                 if v is not None}
    if args.kl_target_from_parent is not None:
        overrides.update(adaptive_kl=True, kl_target_from_parent=True,
                         kl_target=args.kl_target_from_parent)
    prompts = load_shipped_prompts()
    eval_prompts = prompts[-EVAL_PROMPTS:]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "tiny")
        sft = sft_tiny_base(base, root / "sft", prompts)
        for seed in range(args.seeds):
            if seed == 0 or args.votes == "crowd":
                votes = hidden_rule_votes(N_VOTES, prompts, seed=1) \
                    if args.votes == "hidden-rule" else crowd_votes(sft, prompts, N_VOTES, seed)
                reward = train_reward_model(votes, base, tiny.reward)
                decisive = sum(v.winner in ("a", "b") for v in votes) / len(votes)
                row = measure(sft, None, reward, eval_prompts)
                print(f"RM of seed {seed}: {decisive:.0%} of its votes decisive, held-out "
                      f"accuracy {reward.metrics['heldout_accuracy']:.2f}; base (SFT) banana "
                      f"{row['banana']:.2f}  RM banana {row['rm_banana']:+.2f} other "
                      f"{row['rm_other']:+.2f}", flush=True)
            preset = replace(tiny.ppo, seed=seed, **overrides)
            parent: Path | None = None
            kl_coef_final: float | None = None  # the parent run's β, where the next one starts
            for iteration in range(1, args.iterations + 1):
                result = train_policy(
                    sft, preset, reward.model.score, PromptPool(),
                    lambda tok, p=preset: TransformersRollout(
                        tok.eos_token_id, tok.pad_token_id, p.max_new_tokens, p.temperature),
                    parent_adapter=parent,
                    initial_kl_coef=kl_coef_final if preset.adaptive_kl else None)
                kl_coef_final = result.metrics["kl_coef_final"]
                parent = root / f"seed{seed}-v{iteration}"
                save_adapter(result.model, result.value_head, parent)
                m, row = result.metrics, measure(sft, parent, reward, eval_prompts)
                print(f"seed {seed} v{iteration}  banana {row['banana']:.2f}  RM banana "
                      f"{row['rm_banana']:+.2f} other {row['rm_other']:+.2f}  PPO reward "
                      f"{m['reward_start']:+.2f} -> {m['reward_end']:+.2f}, KL "
                      f"{m['kl_start']:.2f} -> {m['kl_end']:.2f} (step peak "
                      f"{max(r['kl'] for r in result.history):.2f}), β "
                      f"{result.metrics['kl_coef_start']:.3f} -> {kl_coef_final:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
