"""Judges for tests/test_crowd.py, loaded by name as `crowd_judges_example:<function>` (the
tests folder is on sys.path under pytest), the way a user loads their own judge."""

from __future__ import annotations

import random


def prefers_first(messages: list[dict], answer_a: str, answer_b: str,
                  rng: random.Random) -> str:
    """Always the answer shown first: a pure position bias."""
    return "a"


def same_or_first(messages: list[dict], answer_a: str, answer_b: str,
                  rng: random.Random) -> str:
    """A tie when both answers are the same text, else the first."""
    return "tie" if answer_a == answer_b else "a"


def says_maybe(messages: list[dict], answer_a: str, answer_b: str, rng: random.Random) -> str:
    """Not a verdict: checked_verdict must refuse it."""
    return "maybe"


NOT_A_JUDGE = 42
