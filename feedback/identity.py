"""Answers that reveal which version wrote them. A vote on such a battle may have been cast
knowing the sides, so it is flagged and kept out of the ratings and of training (Chatbot
Arena drops votes whose answers contain model names in the same way).

Identity terms: the battle's version ids, except ids that are everyday words (`base`: an
answer about a "base" of anything is no tell), plus the deployment's `identity_words` (e.g. the
name of the fine-tuned model family). Matched case-insensitively as whole words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

IDENTITY_FLAG = "identity"


def identity_terms(version_ids: Iterable[str], extra_words: Iterable[str] = ()) -> list[str]:
    """The terms that give a side away: ids with a digit or a separator, and `extra_words`."""
    terms = {v for v in version_ids if not v.isalpha()} | {w for w in extra_words if w.strip()}
    return sorted(terms)


def reveals_identity(answers: Iterable[str], terms: Iterable[str]) -> bool:
    patterns = [re.compile(rf"(?<![\w-]){re.escape(t)}(?![\w-])", re.IGNORECASE)
                for t in terms]
    return any(p.search(answer) for answer in answers for p in patterns)


def vote_flags(answers: Iterable[str], version_ids: Iterable[str],
               extra_words: Iterable[str] = ()) -> list[str]:
    """The flags of a battle's ballot: ["identity"] when an answer names a version."""
    return [IDENTITY_FLAG] if reveals_identity(answers, identity_terms(version_ids,
                                                                       extra_words)) else []
