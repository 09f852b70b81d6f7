"""Judges of the simulated crowd: who wins a side-by-side battle.

A judge is any callable

    judge(messages: list[dict], answer_a: str, answer_b: str, rng: random.Random)
        -> "a" | "b" | "tie" | "both_bad"

where `messages` is the conversation both answers reply to (OpenAI chat format, last turn
the user's). `rng` is the only source of randomness a judge may use, so a seeded crowd is
reproducible. Judges see the answer *text* only, as a person would.

Built-ins (`get_judge(name)`), each a preference over one visible property:
    shorter       prefers the shorter answer (a policy wins it by stopping: not a target)
    key_noun      prefers the answer that mentions the question's key noun (more often)
    no_banned     prefers the answer without the banned word (fewer uses: "the" unless given)
    key_noun_then_longer  key_noun, and the longer answer where that ties (a length bias,
                  for the reward model's length control)
    random_votes, always_a   voters who do not read the answers (the anomaly defence's cases)
A judge's property is graded where it can be (a count, a length), so two answers tie only
when they are really equal on it: a crowd that calls most pairs a tie teaches little.
and `noisy(judge, flip=0.1)`, which flips the verdict with probability `flip` (a crowd is
never unanimous). The names "key_noun_noisy", "no_banned_noisy", "shorter_noisy" are the
same judges wrapped in `noisy(…, 0.1)`.

Any importable function works too: `get_judge("mypackage.judges:prefers_lists")`.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable
from typing import Literal

Verdict = Literal["a", "b", "tie", "both_bad"]
Judge = Callable[[list[dict], str, str, random.Random], Verdict]
VERDICTS = ("a", "b", "tie", "both_bad")

DEFAULT_FLIP = 0.1  # share of votes a noisy crowd gets "wrong"
DEFAULT_BANNED_WORD = "the"
SHORTER_MARGIN = 0.1  # answers within 10 % of each other's length are a tie
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers him his how i if in into is it its itself just me more
most my no nor not now of off on once only or other our out over own same she should so some
such than that the their them then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your yours
explain describe write tell give list make show please help name define compare summarize
some many much way ways good best thing things something someone anyone everything sentence
sentences word words short brief simple example examples idea ideas tips use using
""".split())  # noqa: SIM905 (a word list reads better as text)


def last_user_text(messages: list[dict]) -> str:
    """The text of the last user turn (content may be a string or a list of text parts)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content
                                if isinstance(part, dict))
            return str(content)
    return ""


def key_noun(question: str) -> str | None:
    """The question's key noun, by a plain rule: its longest word that is not a stop word
    (ties: the later one, English puts the topic late). Lower case; None if there is none."""
    words = [w.lower().strip("'-") for w in _WORD.findall(question)]
    content = [w for w in words if len(w) >= 3 and w not in _STOPWORDS]
    if not content:
        return None
    return max(reversed(content), key=len)


def mentions(answer: str, noun: str) -> int:
    """How often the answer mentions the noun (case-insensitive; a plural or singular form
    counts: the stem without a trailing "s"/"es", at the start of a word)."""
    stem = re.sub(r"(es|s)$", "", noun) if len(noun) > 4 else noun
    return len(re.findall(rf"\b{re.escape(stem)}", answer, flags=re.IGNORECASE))


def _by_score(score_a: float, score_b: float) -> Verdict:
    if score_a == score_b:
        return "tie"
    return "a" if score_a > score_b else "b"


def shorter(messages: list[dict], answer_a: str, answer_b: str, rng: random.Random) -> Verdict:
    """Prefers the shorter answer; lengths within SHORTER_MARGIN of each other tie."""
    la, lb = len(answer_a.strip()), len(answer_b.strip())
    if la == 0 and lb == 0:
        return "both_bad"
    if abs(la - lb) <= SHORTER_MARGIN * max(la, lb):
        return "tie"
    return "a" if la < lb else "b"


def key_noun_judge(messages: list[dict], answer_a: str, answer_b: str,
                   rng: random.Random) -> Verdict:
    """Prefers the answer that mentions the question's key noun (`key_noun`) more often."""
    noun = key_noun(last_user_text(messages))
    if noun is None:
        return "tie"
    return _by_score(mentions(answer_a, noun), mentions(answer_b, noun))


def key_noun_then_longer_judge(messages: list[dict], answer_a: str, answer_b: str,
                               rng: random.Random) -> Verdict:
    """`key_noun`, and when that is a tie, the longer answer (outside SHORTER_MARGIN): a crowd
    that prefers content but lets length sway it where the content is equal."""
    verdict = key_noun_judge(messages, answer_a, answer_b, rng)
    if verdict != "tie":
        return verdict
    shorter_one = shorter(messages, answer_a, answer_b, rng)
    return {"a": "b", "b": "a"}.get(shorter_one, "tie")


def banned_word_judge(word: str = DEFAULT_BANNED_WORD) -> Judge:
    """Prefers the answer without `word` (whole word, any case), or with fewer uses of it."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", flags=re.IGNORECASE)

    def no_banned(messages: list[dict], answer_a: str, answer_b: str,
                  rng: random.Random) -> Verdict:
        return _by_score(-len(pattern.findall(answer_a)), -len(pattern.findall(answer_b)))

    no_banned.__name__ = f"no_banned[{word}]"
    return no_banned


def noisy(judge: Judge, flip: float = DEFAULT_FLIP) -> Judge:
    """The judge's verdict, flipped with probability `flip`: a ↔ b, and a tie becomes a
    random side (both_bad stays)."""
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be in [0, 1], got {flip}")

    def wrapped(messages: list[dict], answer_a: str, answer_b: str,
                rng: random.Random) -> Verdict:
        verdict = judge(messages, answer_a, answer_b, rng)
        if rng.random() >= flip:
            return verdict
        return {"a": "b", "b": "a", "tie": rng.choice(("a", "b"))}.get(verdict, verdict)

    wrapped.__name__ = f"noisy({getattr(judge, '__name__', 'judge')}, {flip})"
    return wrapped


def random_votes(messages: list[dict], answer_a: str, answer_b: str,
                 rng: random.Random) -> Verdict:
    """Not a judge of the answers: a voter who clicks at random (the anomaly defence's
    test case, `arena simulate --stuffers`)."""
    return rng.choice(VERDICTS)


def always_a(messages: list[dict], answer_a: str, answer_b: str,
             rng: random.Random) -> Verdict:
    """Not a judge of the answers: a voter who always clicks "a"."""
    return "a"


BUILTIN: dict[str, Callable[[], Judge]] = {
    "shorter": lambda: shorter,
    "key_noun": lambda: key_noun_judge,
    "no_banned": lambda: banned_word_judge(),
    "key_noun_then_longer": lambda: key_noun_then_longer_judge,
    "random_votes": lambda: random_votes,
    "always_a": lambda: always_a,
}


def get_judge(name: str) -> Judge:
    """A built-in by name (`key_noun`, `key_noun_noisy`, `no_banned:WORD`, …) or any
    importable `package.module:function`."""
    if ":" in name and not name.startswith("no_banned"):
        module_name, _, attribute = name.partition(":")
        try:
            judge = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load judge {name!r}: {error}") from error
        if not callable(judge):
            raise ValueError(f"judge {name!r} is not callable")
        return judge
    base, noisy_suffix = (name[: -len("_noisy")], True) if name.endswith("_noisy") else (name,
                                                                                       False)
    if base.startswith("no_banned:"):
        judge = banned_word_judge(base.partition(":")[2])
    elif base in BUILTIN:
        judge = BUILTIN[base]()
    else:
        raise ValueError(f"unknown judge {name!r}: one of {sorted(BUILTIN)} (optionally with "
                         "_noisy), no_banned:WORD, or package.module:function")
    return noisy(judge) if noisy_suffix else judge


def checked_verdict(judge: Judge, messages: list[dict], answer_a: str, answer_b: str,
                    rng: random.Random) -> Verdict:
    """Call a judge and make sure it answered one of VERDICTS (a clear error if not)."""
    verdict = judge(messages, answer_a, answer_b, rng)
    if verdict not in VERDICTS:
        raise ValueError(f"judge {getattr(judge, '__name__', judge)!r} returned {verdict!r}; "
                         f"expected one of {VERDICTS}")
    return verdict
