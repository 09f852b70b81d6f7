"""Benchmark: does the voter anomaly defence find the stuffers, and does it help?

A simulated crowd over 8 versions that differ in how often they write what the crowd likes
(the " banana" marker of testkit/hidden_rule_votes.py, 10 % ... 90 % of answers). 90 % of the voters
are honest (the marker wins, 10 % of verdicts flipped); 10 % vote at random or always "a".
All votes go, in time order and in batches as the consumer sees them, through the real scorer
(feedback/voter_scores.py) on a private Redis. Printed, defence on and off side by side:
    precision and recall of the flags (targets >= 0.9 / >= 0.8)
    Kendall tau of the Bradley-Terry leaderboard to the honest crowd's (honest votes only)
    the reward model's held-out accuracy (tiny model; on fresh pairs labelled by the rule)

    .venv/bin/python benchmarks/voter_anomaly.py                  # ~3 min, 2 RM trainings
    .venv/bin/python benchmarks/voter_anomaly.py --no-reward-model --voters 200
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import redis
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arena.redis_server import start_redis  # noqa: E402
from elo.bradley_terry import bootstrap  # noqa: E402
from feedback.vote_record import VoteRecord  # noqa: E402
from feedback.voter_anomaly import is_flagged  # noqa: E402
from feedback.voter_scores import score_votes  # noqa: E402
from learner.prompt_pool import load_shipped_prompts  # noqa: E402
from testkit.hidden_rule_votes import MARKER, hidden_rule_votes, random_answer  # noqa: E402
from testkit.net import free_port  # noqa: E402

MARKER_RATES = np.linspace(0.1, 0.9, 8)
VERSIONS = ["base"] + [f"policy-v{i}" for i in range(1, len(MARKER_RATES))]
FLIP = 0.1
BATCH = 100


def honest(rng: random.Random, answer_a: str, answer_b: str) -> str:
    has_a, has_b = MARKER in answer_a, MARKER in answer_b
    verdict = "tie" if has_a == has_b else ("a" if has_a else "b")
    if rng.random() < FLIP:
        verdict = rng.choice([v for v in ("a", "b", "tie") if v != verdict])
    return verdict


BEHAVIOURS = {
    "honest": honest,
    "random": lambda rng, a, b: rng.choice(["a", "b", "tie", "both_bad"]),
    "always_a": lambda rng, a, b: "a",
}


def crowd(voters: int, votes_each: int, bad_share: float, prompts: list[str],
          seed: int) -> tuple[list[VoteRecord], dict[str, str]]:
    rng = random.Random(seed)
    kinds = {}
    n_bad = round(voters * bad_share)
    for i in range(voters):
        kind = "honest" if i >= n_bad else ("random" if i % 2 else "always_a")
        kinds[f"{kind}-{i}"] = kind
    turns = [session for session in kinds for _ in range(votes_each)]
    rng.shuffle(turns)  # everyone votes at once, interleaved
    records = []
    for t, session in enumerate(turns):
        i, j = rng.sample(range(len(VERSIONS)), 2)
        answers = [random_answer(rng, rng.random() < MARKER_RATES[k]) for k in (i, j)]
        conversation = [{"role": "user", "content": rng.choice(prompts)}]
        records.append(VoteRecord(
            battle_id=str(uuid.UUID(int=rng.getrandbits(128))), model_a=VERSIONS[i],
            model_b=VERSIONS[j], winner=BEHAVIOURS[kinds[session]](rng, *answers),
            conversation_a=conversation, conversation_b=conversation, answer_a=answers[0],
            answer_b=answers[1], session=session, battle_created_at=1e9 + 10 * t,
            voted_at=1e9 + 10 * t + 8))
    return records, kinds


def leaderboard(records: list[VoteRecord]) -> list[float]:
    fit = bootstrap(((r.model_a, r.model_b, r.winner) for r in records), rounds=1)
    return [fit.ratings[v] for v in VERSIONS]


def reward_accuracy(records: list[VoteRecord], prompts: list[str], root: Path) -> float:
    from learner.presets import get_preset
    from learner.reward_model import evaluate_pairs, train_reward_model, votes_to_pairs
    from testkit.tiny_model import build_tiny_model

    base = root / "tiny"
    if not base.exists():
        build_tiny_model(base)
    preset = get_preset("tiny").reward
    result = train_reward_model(records, base, preset)
    # Fresh pairs the rule decides (no noise, no ties): what the crowd really prefers.
    fresh = hidden_rule_votes(400, prompts, seed=99, tie_share=0.0, both_bad_share=0.0)
    pairs, _ = votes_to_pairs(fresh, result.tokenizer, preset)
    metrics = evaluate_pairs(result.model, pairs, result.tokenizer.pad_token_id,
                             preset.batch_size)
    return float(metrics["accuracy"] or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voters", type=int, default=100)
    parser.add_argument("--votes-each", type=int, default=40)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reward-model", action="store_true")
    args = parser.parse_args()
    prompts = load_shipped_prompts()
    records, kinds = crowd(args.voters, args.votes_each, args.bad_share, prompts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        server = start_redis(port, root / "redis", "no")
        try:
            client = redis.Redis(port=port)
            scores: dict[str, float] = {}
            for start in range(0, len(records), BATCH):
                scores.update(score_votes(client, records[start:start + BATCH]))
        finally:
            server.terminate()
            server.wait()
        flagged = {s for s, score in scores.items() if is_flagged(score)}
        bad = {s for s, kind in kinds.items() if kind != "honest"}
        precision = len(flagged & bad) / len(flagged) if flagged else float("nan")
        recall = len(flagged & bad) / len(bad) if bad else float("nan")
        print(f"{len(records):,} votes, {args.voters} voters ({len(bad)} anomalous: random or "
              f"always 'a'), {args.votes_each} votes each, {len(VERSIONS)} versions")
        print(f"flags: {len(flagged)}  precision {precision:.2f} (target >= 0.9)  "
              f"recall {recall:.2f} (target >= 0.8)")
        for kind in ("honest", "random", "always_a"):
            of_kind = [s for s, k in kinds.items() if k == kind]
            if of_kind:
                share = sum(s in flagged for s in of_kind) / len(of_kind)
                print(f"  {kind:8s} flagged {share:.2f}  median score "
                      f"{np.median([scores.get(s, 0.0) for s in of_kind]):.2f}")

        honest_votes = [r for r in records if kinds[r.session] == "honest"]
        kept = [r for r in records if r.session not in flagged]
        reference = leaderboard(honest_votes)
        tau_off = kendalltau(reference, leaderboard(records)).statistic
        tau_on = kendalltau(reference, leaderboard(kept)).statistic
        truth_on = kendalltau(MARKER_RATES, leaderboard(kept)).statistic
        truth_off = kendalltau(MARKER_RATES, leaderboard(records)).statistic
        print(f"Kendall tau to the honest crowd's leaderboard: defence on {tau_on:.3f}, "
              f"off {tau_off:.3f}  (to the true order: on {truth_on:.3f}, off {truth_off:.3f})")
        if not args.no_reward_model:
            on = reward_accuracy(kept, prompts, root)
            off = reward_accuracy(records, prompts, root)
            print(f"reward model held-out accuracy: defence on {on:.3f}, off {off:.3f}")


if __name__ == "__main__":
    main()
