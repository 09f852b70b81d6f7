"""Synthetic votes for tests and benchmarks: battles between models of known hidden strength,
outcomes drawn from the Bradley-Terry model, with realistic-looking conversations."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence

from feedback.vote_record import VoteRecord, Winner

DEFAULT_STRENGTHS = {"base": 1000.0, "policy-v1": 1050.0, "policy-v2": 1100.0}
TIE_SHARE = 0.1
BOTH_BAD_SHARE = 0.05
TOPICS = ("the capital of France", "a haiku about rain", "binary search", "photosynthesis",
          "the French revolution", "a limerick about cats", "Redis streams", "tax brackets")


def synthetic_vote(
    rng: random.Random, model_a: str, model_b: str, winner: Winner, voted_at: float
) -> VoteRecord:
    topic = rng.choice(TOPICS)
    prompt = [{"role": "user", "content": f"Tell me about {topic} (#{rng.randrange(10**6)})."}]
    return VoteRecord(
        battle_id=uuid.UUID(int=rng.getrandbits(128)).hex,
        model_a=model_a, model_b=model_b, winner=winner,
        conversation_a=list(prompt), conversation_b=list(prompt),
        answer_a=f"{model_a} on {topic}: " + "lorem ipsum " * rng.randint(5, 40),
        answer_b=f"{model_b} on {topic}: " + "dolor sit amet " * rng.randint(5, 40),
        session=f"s-{rng.randrange(500):03d}",
        battle_created_at=voted_at - rng.uniform(2.0, 60.0), voted_at=voted_at,
    )


def synthetic_votes(
    n: int,
    strengths: dict[str, float] | None = None,
    seed: int = 0,
    start: float | None = None,
    spacing_s: float = 1.0,
    self_pairs: bool = False,
) -> list[VoteRecord]:
    """`n` votes, `spacing_s` seconds apart from `start` (default: n * spacing_s ago)."""
    strengths = strengths or DEFAULT_STRENGTHS
    models: Sequence[str] = list(strengths)
    rng = random.Random(seed)
    t0 = start if start is not None else time.time() - n * spacing_s
    records = []
    for i in range(n):
        if self_pairs or len(models) < 2:
            model_a = model_b = rng.choice(models)
        else:
            model_a, model_b = rng.sample(models, 2)
        records.append(synthetic_vote(rng, model_a, model_b,
                                      _draw_winner(rng, strengths, model_a, model_b),
                                      t0 + i * spacing_s))
    return records


def _draw_winner(rng: random.Random, strengths: dict[str, float], a: str, b: str) -> Winner:
    u = rng.random()
    if u < BOTH_BAD_SHARE:
        return "both_bad"
    if u < BOTH_BAD_SHARE + TIE_SHARE:
        return "tie"
    p_a = 1.0 / (1.0 + 10 ** ((strengths[b] - strengths[a]) / 400.0))
    return "a" if rng.random() < p_a else "b"
