"""Logging set-up for MLOC's processes: stderr, and optionally a size-rotated file; plain text or JSON lines."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from pathlib import Path

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


def setup(
    level: str = "INFO",
    *,
    json_lines: bool = False,
    file: Path | None = None,
    max_bytes: int = 10 << 20,
    backups: int = 5,
) -> None:
    """Send every logger's records at ``level`` and above to stderr, and to ``file`` when given.

    The file rotates at ``max_bytes`` keeping ``backups`` old files (orchestrator.log.1, ...), so a
    long-running process never fills its disk with logs."""
    formatter = JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        )
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
