"""Redis replies as text: redis-py returns bytes unless a client sets decode_responses, and
ours do not (the vote path reads raw bytes). One helper for every module that reads them."""

from __future__ import annotations

from typing import overload


@overload
def as_str(value: bytes | str) -> str: ...
@overload
def as_str(value: None) -> None: ...
def as_str(value: bytes | str | None) -> str | None:
    """bytes decoded as UTF-8 (an invalid byte becomes U+FFFD, never an error); str and None
    as they are."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
