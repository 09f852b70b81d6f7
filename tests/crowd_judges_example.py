"""Judges for tests/test_crowd.py and tests/test_loop_integration.py, loaded by name as
`crowd_judges_example:<function>` (the tests folder is on sys.path under pytest), the way a
user loads their own judge."""

from __future__ import annotations

import random
import re

from crowd.judges import noisy


def prefers_first(messages: list[dict], answer_a: str, answer_b: str,
                  rng: random.Random) -> str:
    """Always the answer shown first: a pure position bias."""
    return "a"


def prefers_second(messages: list[dict], answer_a: str, answer_b: str,
                   rng: random.Random) -> str:
    """Always the answer shown second."""
    return "b"


def same_or_first(messages: list[dict], answer_a: str, answer_b: str,
                  rng: random.Random) -> str:
    """A tie when both answers are the same text, else the first."""
    return "tie" if answer_a == answer_b else "a"


def says_maybe(messages: list[dict], answer_a: str, answer_b: str, rng: random.Random) -> str:
    """Not a verdict: checked_verdict must refuse it."""
    return "maybe"


NOT_A_JUDGE = 42


_BANANA = re.compile(r"\bbanana", flags=re.IGNORECASE)


def prefers_banana(messages: list[dict], answer_a: str, answer_b: str,
                   rng: random.Random) -> str:
    """The answer that says "banana" (testkit.hidden_rule_votes.MARKER, which the SFT'd tiny base
    writes in about a fifth of its answers) wins; both or neither: a tie. Presence, not
    count: a judge that counts uses rewards "banana banana banana", which the loop's sanity
    gate (repeated 3-grams) rightly rejects. The learnable judge of
    tests/test_loop_integration.py."""
    a, b = bool(_BANANA.search(answer_a)), bool(_BANANA.search(answer_b))
    return "tie" if a == b else "a" if a else "b"


prefers_banana_noisy = noisy(prefers_banana, 0.1)  # a tenth of the verdicts flipped
