"""A task's log: the Redis stream a person reads to learn what happened to one task, its entries'
format, the lifecycle lines MLOC writes into it, and reading it back filtered.

Every entry has ``ts`` (unix seconds, the writer's clock), ``level`` (DEBUG, INFO, WARNING, ERROR,
CRITICAL), ``source`` and ``text``; a lifecycle line also has ``event``. The sources:

- ``mloc``: MLOC's own lines, the lifecycle (assigned, started, requeued, succeeded, failed, cancelled);
- ``executor``: what the executor reports (``ctx.log``, its own loggers), e.g. a training run's loss;
- ``library``: third-party output captured from the executor process (vLLM, torch, transformers, tqdm);
- ``stdout``, ``stderr``: captured output MLOC could not attribute.

Both processes write lifecycle lines, each right after the move it made (see :func:`append`): the
scheduler "assigned", the worker "started" and how the attempt ended, a hand-back "requeued" or
"failed", a cancel "cancelled". Most are not part of the move's atomic step: a line is lost, never
the move, when Redis fails in between. The worker's line saying how an attempt ended (and, for work
that finished at once, its "assigned" and "started") travel in the transition script itself
(``Change.log``): written with the move, in the same round trip. Times are compared with ``ts``,
never with entry ids, which carry Redis's clock.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.state import TaskState

log = logging.getLogger(__name__)


class Source(StrEnum):
    MLOC = "mloc"  # MLOC's own lines and the lifecycle
    EXECUTOR = "executor"  # the executor's own reports and loggers
    LIBRARY = "library"  # third-party output captured from the executor process
    STDOUT = "stdout"  # captured output MLOC could not attribute
    STDERR = "stderr"


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_ENTRIES = 10_000  # entries kept per task (approximately: the stream is trimmed in whole nodes)
MAX_TEXT = 65_536  # characters of one entry's text
DEFAULT_RETENTION_SEC = 7 * 86_400.0  # MLOC_LOG_RETENTION_SEC
ENDINGS = frozenset(state.value for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED))
# A follower that sees a task end waits this long after it ended for the line saying how (the
# worker writes it right after recording the end).
END_LINE_GRACE_SEC = 3.0
_CHUNK = 1000


_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "ERR": "ERROR"}


def level_of(name: object) -> str:
    """A level name as stored: one of :data:`LEVELS` (an unknown name is INFO)."""
    upper = str(name or "INFO").upper()
    upper = _LEVEL_ALIASES.get(upper, upper)
    return upper if upper in LEVELS else "INFO"


def fields(text: str, *, level: str = "INFO", source: str = Source.MLOC, ts: float | None = None) -> dict[str, str]:
    """One entry as stored."""
    return {
        "ts": repr(time.time() if ts is None else float(ts)),
        "level": level_of(level),
        "source": str(source),
        "text": text[:MAX_TEXT],
    }


# ------------------------------------------------------------------ lifecycle
@dataclass(frozen=True)
class Line:
    """A lifecycle line: the ``event`` (the state entered, or what happened) and its text."""

    event: str
    text: str
    level: str = "INFO"


def assigned(worker_id: str, gpus: Collection[int] = ()) -> Line:
    on = f" (GPUs {', '.join(map(str, gpus))})" if gpus else ""
    return Line("assigned", f"assigned to {worker_id}{on}")


def started(worker_id: str, attempt: int) -> Line:
    # Every start counts here, a requeue's too: `mloc show` tells the task's attempts from its requeues.
    return Line("started", f"started on {worker_id} (run {attempt})")


def ended(state: str, reason: str = "", seconds: float | None = None) -> Line:
    """How an attempt or a task ended: succeeded, failed or cancelled, with its reason."""
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    if state == TaskState.SUCCEEDED:
        return Line(state, f"succeeded{took}")
    if state == TaskState.CANCELLED:
        text = reason if reason.startswith("cancelled") else f"cancelled: {reason or 'on request'}"
        return Line(state, text, "WARNING")
    return Line(str(state), f"failed{took}: {reason or 'no reason given'}", "ERROR")


def requeued(reason: str, detail: str, retry_in: float | None) -> Line:
    when = f"retry in {retry_in:.1f} s" if retry_in else "placeable again now"
    return Line("requeued", f"requeued after {reason} ({detail}); {when}", "WARNING")


def cancel_requested(by: str) -> Line:
    return Line("cancel_requested", f"cancel requested by {by}; the worker stops the task")


def stored(line: Line) -> dict[str, str]:
    """A lifecycle line as stored."""
    return {**fields(line.text, level=line.level), "event": line.event}


def add(pipe: Any, task_id: str, line: Line, *, retention_sec: float | None = None) -> None:
    """Queue ``line`` on a pipeline. With ``retention_sec`` the log expires that long after this
    write, as the worker's writes do; without it the expiry is left as it is (a log only the
    orchestrator wrote lives as long as its task record)."""
    stream = keys.task_logs(task_id)
    pipe.xadd(stream, stored(line), maxlen=MAX_ENTRIES, approximate=True)
    if retention_sec is not None:
        pipe.pexpire(stream, max(1, int(retention_sec * 1000)))


async def append(redis: aioredis.Redis, task_id: str, *lines: Line, retention_sec: float | None = None) -> None:
    """Write lifecycle lines in one round trip. A failure is logged, not raised: the move they
    report has been made, and a missing line must not undo or repeat it."""
    pipe = redis.pipeline(transaction=False)
    for line in lines:
        add(pipe, task_id, line, retention_sec=retention_sec)
    try:
        await pipe.execute()
    except aioredis.RedisError as exc:
        log.warning("task %s: could not write %s to its log: %s", task_id, [line.event for line in lines], exc)


# -------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Since:
    """Where reading starts: after a stream entry id, or at a time (``ts``), or at the beginning."""

    after_id: str | None = None
    ts: float | None = None


SINCE_FORMS = (
    "a duration ago (30s, 10m, 2h, 1d, 1h30m), unix seconds, an ISO 8601 time (2026-05-09T07:35:00Z; "
    "UTC when it names no zone) or a log entry id (1715240000000-0)"
)
_ENTRY_ID = re.compile(r"^\d+-\d+$")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_UNIX = re.compile(r"^\d{9,11}(?:\.\d+)?$")


def parse_since(text: str, now: float | None = None) -> Since:
    """``since`` as the API takes it; raises ValueError naming the forms it accepts."""
    value = text.strip()
    if value in ("", "0"):
        return Since()
    if _ENTRY_ID.match(value):
        return Since(after_id=value)
    now = time.time() if now is None else now
    if _DURATION.match(value.lower()):
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value.lower()))
        return Since(ts=now - seconds)
    if _UNIX.match(value):
        return Since(ts=float(value))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"since={text[:80]!r} is not a time; give {SINCE_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Since(ts=moment.timestamp())


def parse_sources(text: str | None) -> frozenset[str] | None:
    """A comma-separated list of sources, or None for all; raises ValueError naming the known ones."""
    if not text or not text.strip():
        return None
    wanted = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - {source.value for source in Source})
    if unknown:
        known = ", ".join(source.value for source in Source)
        raise ValueError(f"unknown log source {', '.join(unknown)}; the sources are {known} (comma-separated)")
    return frozenset(wanted)


def _seconds(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def entry(entry_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """A stored entry as the API shows it."""
    level = (raw.get("level") or "INFO").upper()
    source = raw.get("source")
    if not source:
        # Written before entries named their source: captured output put its stream in ``level``.
        source, level = (level.lower(), "INFO") if level in ("STDOUT", "STDERR") else (Source.EXECUTOR.value, level)
    body: dict[str, Any] = {
        "id": entry_id,
        "ts": _seconds(raw.get("ts")),
        "level": level,
        "source": source,
        "text": raw.get("text", raw.get("message", "")),
    }
    if raw.get("event"):
        body["event"] = raw["event"]
    return body


def _wanted(item: dict[str, Any], sources: frozenset[str] | None, since: Since) -> bool:
    if sources is not None and item["source"] not in sources:
        return False
    return since.ts is None or (item["ts"] is not None and item["ts"] >= since.ts)


@dataclass
class Page:
    """Entries read, the id to read on after (the newest id looked at), and whether ``limit`` cut it."""

    entries: list[dict[str, Any]]
    next_id: str
    more: bool = False


async def read(
    redis: aioredis.Redis,
    task_id: str,
    *,
    sources: frozenset[str] | None = None,
    since: Since = Since(),
    tail: int | None = None,
    limit: int = 1000,
) -> Page:
    """The entries from ``since`` on, of ``sources``: the first ``limit``, or with ``tail`` the last
    ``tail``, oldest first. A time is matched against each entry's ``ts``, wherever it stands in the
    stream (writers' clocks and buffers differ), which costs a scan of at most :data:`MAX_ENTRIES`."""
    stream = keys.task_logs(task_id)
    start = f"({since.after_id}" if since.after_id else "-"
    if tail is None:
        found: list[dict[str, Any]] = []
        cursor, last = start, since.after_id or "0"
        while True:
            batch = await redis.xrange(stream, min=cursor, max="+", count=_CHUNK)
            for entry_id, raw in batch:
                item = entry(entry_id, raw)
                if _wanted(item, sources, since):
                    if len(found) == limit:
                        return Page(found, last, more=True)
                    found.append(item)
                last = entry_id
            if len(batch) < _CHUNK:
                return Page(found, last)
            cursor = f"({last}"
    newest: str | None = None
    kept: list[dict[str, Any]] = []
    cursor = "+"
    while len(kept) < tail:
        batch = await redis.xrevrange(stream, max=cursor, min=start, count=max(_CHUNK, tail))
        for entry_id, raw in batch:
            newest = newest or entry_id
            item = entry(entry_id, raw)
            if _wanted(item, sources, since):
                kept.append(item)
                if len(kept) == tail:
                    break
        if len(batch) < max(_CHUNK, tail):
            break
        cursor = f"({batch[-1][0]}"
    kept.reverse()
    return Page(kept, newest or since.after_id or "0")


@dataclass(frozen=True)
class End:
    """The task ended: its final state and reason."""

    state: str
    reason: str = ""


async def _ended_in_log(redis: aioredis.Redis, stream: str) -> bool:
    """Whether the log's last entries include the line saying how the task ended."""
    newest = await redis.xrevrange(stream, count=5)
    return any(raw.get("event") in ENDINGS for _, raw in newest)


async def follow(
    redis: aioredis.Redis,
    task_id: str,
    *,
    sources: frozenset[str] | None = None,
    since: Since = Since(),
    tail: int | None = None,
    poll_sec: float = 1.0,
    keepalive_sec: float = 10.0,
) -> AsyncIterator[dict[str, Any] | End | None]:
    """The entries as :func:`read` gives them, then new ones as they come, then :class:`End` once
    the task has ended and its last line is in. ``None`` now and then while nothing is written,
    so a connection through a proxy stays open and a client sees the orchestrator is still there."""
    stream = keys.task_logs(task_id)
    last = since.after_id or "0"
    if tail is not None:
        page = await read(redis, task_id, sources=sources, since=since, tail=tail)
        for item in page.entries:
            yield item
        last = page.next_id
    quiet_since = time.monotonic()
    give_up_at: float | None = None
    while True:
        reply = await redis.xread({stream: last}, count=500, block=max(1, int(poll_sec * 1000)))
        for _, batch in reply or []:
            for entry_id, raw in batch:
                last = entry_id
                item = entry(entry_id, raw)
                if _wanted(item, sources, since):
                    quiet_since = time.monotonic()
                    yield item
        if reply:
            continue
        state, reason, finished_at = await redis.hmget(keys.task(task_id), "state", "reason", "finished_at")
        if state is None:
            yield End("removed", "the task was removed while its log was followed")
            return
        if state in ENDINGS:
            if give_up_at is None:
                ended_ago = time.time() - (_seconds(finished_at) or 0.0)
                give_up_at = time.monotonic() + max(0.0, END_LINE_GRACE_SEC - ended_ago)
            if time.monotonic() >= give_up_at or await _ended_in_log(redis, stream):
                yield End(state, reason or "")
                return
        if time.monotonic() - quiet_since >= keepalive_sec:
            quiet_since = time.monotonic()
            yield None
        await asyncio.sleep(0)
