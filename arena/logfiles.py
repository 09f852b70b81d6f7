"""Log files that rotate: `<data dir>/logs/<process>.log` would otherwise grow for as long as
the stack runs. A drop-in for the text file the launcher's log pump writes lines to
(`write`, `flush`, `close`, `with`), on the standard library's RotatingFileHandler: past
`max_bytes` the file becomes `<name>.log.1` (older ones `.2` … up to `backups`, the oldest
dropped) and a new one starts."""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from pathlib import Path
from types import TracebackType

LOG_MAX_BYTES = 50 * 1024 * 1024
LOG_BACKUPS = 5


class RotatingLogFile:
    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES,
                 backups: int = LOG_BACKUPS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                            encoding="utf-8")
        self._handler.terminator = ""  # lines arrive with their own newline
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, text: str) -> int:
        # A record's message is used as it is when it has no args (no %-formatting).
        self._handler.handle(logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))
        return len(text)

    def flush(self) -> None:
        self._handler.flush()  # emit() already flushed; kept for the file interface

    def close(self) -> None:
        self._handler.close()

    def __enter__(self) -> RotatingLogFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
