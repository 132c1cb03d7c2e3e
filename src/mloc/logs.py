"""Logging set-up for MLOC's processes: stderr, and optionally a size-rotated file; plain text or JSON lines."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from pathlib import Path

from mloc.errors import ConfigError

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


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
    file_required: bool = True,
) -> None:
    """Send every logger's records at ``level`` and above to stderr, and to ``file`` when given
    (``file_required``: MLOC_LOG_FILE named it, rather than it being the default).

    The file rotates at ``max_bytes`` keeping ``backups`` old files (orchestrator.log.1, ...), so a
    long-running process never fills its disk with logs. A missing folder of the file is created, and
    said so. A file that cannot be written: see :func:`_file_handler`."""
    formatter = JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    # Said once the handlers are in place, so the lines reach stderr in the process's own format.
    said: list[tuple[int, str]] = []
    if file is not None:
        handler = _file_handler(file, max_bytes, backups, said, required=file_required)
        if handler is not None:
            handlers.append(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for line_level, line in said:
        log.log(line_level, "%s", line)


def _file_handler(
    file: Path, max_bytes: int, backups: int, said: list[tuple[int, str]], *, required: bool
) -> logging.Handler | None:
    """The file's handler; None, with a warning in ``said``, for a default file (not ``required``)
    that cannot be written; a ``required`` one that cannot be written raises ConfigError.

    The two differ on purpose. Without MLOC_LOG_FILE the file is a convenience and stderr carries the
    same lines, so a read-only container (Kubernetes' readOnlyRootFilesystem) starts and logs to stderr
    rather than dying over a file nobody asked for. A file MLOC_LOG_FILE names was asked for (a log
    shipper may read it): the process refuses to start with the one line other bad settings get, as an
    unreadable TLS file does, rather than run without the log it was told to keep."""
    where = file.absolute()
    try:
        if not where.parent.is_dir():
            where.parent.mkdir(parents=True, exist_ok=True)
            said.append((logging.INFO, f"created {where.parent} for the log file {where} (MLOC_LOG_FILE)"))
        return logging.handlers.RotatingFileHandler(where, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    except OSError as exc:
        reason = _reason(exc)
        if required:
            raise ConfigError(
                f"MLOC_LOG_FILE {where} cannot be written ({reason}); point MLOC_LOG_FILE at a file in a "
                "writable folder, or set MLOC_LOG_FILE=- to log to stderr only"
            ) from None
        said.append(
            (
                logging.WARNING,
                f"cannot write the log file {where} ({reason}), so logging to stderr only; set MLOC_LOG_FILE to "
                "a file in a writable folder (a volume), or MLOC_LOG_FILE=- for stderr only without this warning",
            )
        )
        return None


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileExistsError):
        # mkdir met a file where a folder of the path should be.
        return f"{exc.filename} is a file, not a folder"
    detail = exc.strerror or type(exc).__name__
    return f"{detail}: {exc.filename}" if exc.filename else detail
