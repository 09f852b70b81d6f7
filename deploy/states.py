"""The version state machine, as pure functions.

    candidate ──promote──► current ──(another is promoted)──► candidate (previous)
        │                     │
        └──retire──► retired ◄┘ (only when it is not current)

Exactly one policy version is `current`. Promoting X demotes the old current back to
`candidate` (it keeps serving and battling) and remembers it for `rollback`.
"""

from __future__ import annotations

from typing import Literal

State = Literal["candidate", "current", "retired"]
STATES: tuple[State, ...] = ("candidate", "current", "retired")


class TransitionError(ValueError):
    """An operator asked for a transition the state machine does not allow."""


def check_promote(version: str, state: State) -> None:
    if state == "current":
        raise TransitionError(f"{version} is already current")
    if state == "retired":
        raise TransitionError(f"{version} is retired; register its files again to serve it")


def check_retire(version: str, state: State) -> None:
    if state == "retired":
        raise TransitionError(f"{version} is already retired")
    if state == "current":
        raise TransitionError(f"{version} is current; promote another version first")
    if version == "base":
        raise TransitionError("base is the frozen reference model and cannot be retired")
