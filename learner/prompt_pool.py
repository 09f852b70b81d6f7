"""The prompts PPO samples from: a set shipped with the project (learner/data/prompts.txt, a
few hundred varied prompts: questions, instructions, chit-chat, code, maths, advice) plus
prompts users sent to the service (the archive's `recent_prompts`), passed in as a plain list
so the pool does not depend on where they came from."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from learner.sequences import Message

log = logging.getLogger(__name__)
SHIPPED_PROMPTS = Path(__file__).parent / "data" / "prompts.txt"
USER_SHARE = 0.5  # chance that a sampled prompt comes from users (when there are any)

Prompt = str | list[Message]


def load_shipped_prompts(path: Path = SHIPPED_PROMPTS) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def as_messages(prompt: Prompt) -> list[Message]:
    """A plain string is one user turn; a message list is kept as is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def is_text_conversation(messages: Any) -> bool:
    """A list of messages whose role and content are strings: what the chat template and
    the tokenizer take. Anything else came from outside (the gateway once archived OpenAI's
    list-of-parts content as is) and must be skipped, not trained on."""
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)


def _is_usable(messages: list[Message]) -> bool:
    """A prompt to answer: the conversation ends with a user turn."""
    return bool(messages) and messages[-1]["role"] == "user" and bool(
        messages[-1]["content"].strip())


def _user_prompts(prompts: list[Any]) -> list[list[Message]]:
    """The users' prompts that can be answered; the others are skipped and counted."""
    conversations = [as_messages(p) if isinstance(p, str | list) else p for p in prompts]
    text = [m for m in conversations if is_text_conversation(m)]
    usable = [m for m in text if _is_usable(m)]
    if len(text) < len(prompts):
        log.warning("prompt pool: skipped %d of %d user prompts whose content is not text",
                    len(prompts) - len(text), len(prompts))
    return usable


class PromptPool:
    def __init__(self, shipped: list[Prompt] | None = None, user: list[Prompt] | None = None,
                 user_share: float = USER_SHARE) -> None:
        self.shipped = [as_messages(p) for p in (load_shipped_prompts() if shipped is None
                                                 else shipped)]
        self.user = _user_prompts(user or [])
        self.user_share = user_share if self.user else 0.0
        if not self.shipped and not self.user:
            raise ValueError("empty prompt pool")

    def __len__(self) -> int:
        return len(self.shipped) + len(self.user)

    def sample(self, n: int, rng: random.Random) -> list[list[Message]]:
        """`n` prompts: each from the users' with probability `user_share`, else shipped."""
        out = []
        for _ in range(n):
            source = self.user if (self.user and (not self.shipped
                                                  or rng.random() < self.user_share)) \
                else self.shipped
            out.append(rng.choice(source))
        return out

    def fixed(self, n: int) -> list[list[Message]]:
        """A fixed evaluation set: every k-th shipped prompt (the same run after run)."""
        source = self.shipped or self.user
        stride = max(1, len(source) // max(n, 1))
        return [source[(i * stride) % len(source)] for i in range(n)]


def user_prompts_from_archive(settings: Any, limit: int) -> list[list[Message]]:
    """Recent prompts users sent, from the preference archive ([] when it is unavailable)."""
    if limit <= 0:
        return []
    try:
        from feedback.archive import Archive

        archive = Archive(settings.effective_archive_url)
        try:
            return archive.recent_prompts(limit)
        finally:
            archive.close()
    except Exception as error:  # noqa: BLE001 - the shipped prompts are enough to train
        log.warning("no user prompts from the archive: %s", error)
        return []
