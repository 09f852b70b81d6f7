"""The prompt sets shipped with the crowd (crowd/data/*.txt): `crowd` is what the simulated
voters ask, `heldout` is for evaluation only. Both are disjoint from each other and from the
learner's PPO prompts (learner/data/prompts.txt), so an evaluation never scores a policy on a
prompt it was trained on or voted on."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

PromptSet = Literal["crowd", "heldout"]
PROMPT_FILES: dict[str, str] = {"crowd": "crowd_prompts.txt", "heldout": "heldout_prompts.txt"}


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def load_prompts(path: Path | str | None = None, which: PromptSet = "crowd") -> list[str]:
    """The prompts in `path`, or the shipped set `which` when no path is given."""
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        source = str(path)
    else:
        if which not in PROMPT_FILES:
            raise ValueError(f"unknown prompt set {which!r}: one of {sorted(PROMPT_FILES)}")
        text = resources.files("crowd").joinpath("data", PROMPT_FILES[which]).read_text(
            encoding="utf-8")
        source = f"crowd/data/{PROMPT_FILES[which]}"
    prompts = parse_prompts(text)
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts
