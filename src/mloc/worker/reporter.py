"""Forwards an executor's events (progress, logs, metrics, usage, artifacts) to Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, stopping, tasklog
from mloc.tasklog import DEFAULT_RETENTION_SEC, Source

log = logging.getLogger(__name__)
METRICS_RETENTION = 5_000
# How often a running task's log stream is trimmed of lines older than the retention, at most.
TRIM_EVERY_SEC = 60.0


class Reporter:
    """Buffers events and writes them to Redis in batches, so a chatty executor costs few round trips.

    Logs and metrics are kept by count (``tasklog.MAX_ENTRIES`` lines) and by age: each write sets the keys to
    expire ``retention_sec`` later, lines older than that are trimmed from a long run's stream, and
    :meth:`close`, when the run ends, starts the last countdown."""

    def __init__(
        self,
        redis: aioredis.Redis,
        task_id: str,
        started: float,
        *,
        retention_sec: float = DEFAULT_RETENTION_SEC,
        run: int = 1,
    ) -> None:
        self.redis = redis
        self.task_id = task_id
        self.run = run  # the attempt: metrics say which run they are of (see mloc.records.current_metrics)
        self.started = started
        self.retention_sec = retention_sec
        self._ttl_ms = max(1, int(retention_sec * 1000))
        self._trimmed_at = time.monotonic()
        self._kept_at: float | None = None  # when this run last wrote logs or metrics (monotonic)
        # Milliseconds of the newest log entry id Redis gave: stream ids carry Redis's clock.
        self._newest_ms: int | None = None
        self.usage: dict[str, float] = {}
        self.artifacts: dict[str, Any] = {}
        # The step and time the time left is told from: the run's start at step 0, unless the executor said
        # where its work began (a resumed training run, from its checkpoint's step, once loaded).
        self._pace_from = (0.0, started)
        self._buffer: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._closed = False
        # Started on the first event, so a task that reports nothing costs nothing.
        self._flusher: asyncio.Task[None] | None = None

    def handle(self, event: dict[str, Any]) -> None:
        """Take an event; must be called on the event loop."""
        kind = event.get("ev")
        if kind == "usage":
            for name, value in event.get("counters", {}).items():
                if isinstance(value, int | float):
                    self.usage[name] = self.usage.get(name, 0.0) + float(value)
            return
        if kind == "progress" and isinstance(event.get("since"), int | float):
            self._pace_from = (float(event["since"]), float(event.get("ts") or time.time()))
        if kind == "artifact":
            self.artifacts[event["name"]] = {
                "path": event["path"],
                "kind": event["kind"],
                **event.get("info", {}),
            }
        self._buffer.append(event)
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(self._run())
        self._wake.set()

    def log_line(self, text: str, *, level: str = "INFO", source: str = Source.STDOUT) -> None:
        """A line of the executor process's output, sorted (see :mod:`mloc.worker.capture`)."""
        self.handle({"ev": "log", "level": level, "source": source, "message": text, "ts": time.time()})

    async def _run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(0.05)

    async def flush(self) -> None:
        events, self._buffer = self._buffer, []
        if not events:
            return
        pipe = self.redis.pipeline(transaction=False)
        progress = None
        logged = measured = False
        newest_at: int | None = None  # the pipeline position of the last XADD
        for event in events:
            kind = event.get("ev")
            if kind == "log":
                newest_at = len(pipe)
                # An executor's own ``ctx.log`` lines name no source; captured output and the
                # executor process's loggers do.
                entry = tasklog.fields(
                    str(event.get("message", "")),
                    level=str(event.get("level", "INFO")),
                    source=str(event.get("source") or Source.EXECUTOR),
                    ts=_seconds(event.get("ts")),
                )
                pipe.xadd(keys.task_logs(self.task_id), entry, maxlen=tasklog.MAX_ENTRIES, approximate=True)
                logged = True
            elif kind == "progress":
                progress = event
            elif kind == "metrics":
                metric: dict[str, Any] = {"step": event["step"], **event["values"], "run": self.run}
                pipe.rpush(keys.task_metrics(self.task_id), json.dumps(metric))
                pipe.ltrim(keys.task_metrics(self.task_id), -METRICS_RETENTION, -1)
                measured = True
            elif kind == "artifact":
                pipe.hset(keys.task(self.task_id), "artifacts", json.dumps(self.artifacts))
        if progress is not None:
            step, total = progress.get("step"), progress.get("total")
            now = time.time()
            elapsed = now - self.started
            eta = None
            done_from, pace_since = self._pace_from
            if total and step and done_from < step < total and now > pace_since:
                eta = round((now - pace_since) * (total - step) / (step - done_from), 1)
            body = {
                "step": step,
                "total": total,
                "message": progress.get("message"),
                "elapsed_sec": round(elapsed, 1),
                "eta_sec": eta,
                "updated_at": time.time(),
            }
            if total:
                body["percent"] = round(100.0 * float(step or 0) / float(total), 1)
            if progress.get("unit"):
                body["unit"] = progress["unit"]
            pipe.hset(keys.task(self.task_id), "progress", json.dumps(body))
        if logged:
            pipe.pexpire(keys.task_logs(self.task_id), self._ttl_ms)
            due = time.monotonic() - self._trimmed_at > min(TRIM_EVERY_SEC, self.retention_sec / 4)
            if due and self._newest_ms is not None:
                self._trimmed_at = time.monotonic()
                # Measured from Redis's clock (the newest id it gave), not this machine's: a worker
                # clock off by more than the retention would otherwise trim every line, or none.
                oldest = self._newest_ms - self._ttl_ms
                pipe.xtrim(keys.task_logs(self.task_id), minid=f"{oldest}-0", approximate=False)
        if measured:
            pipe.pexpire(keys.task_metrics(self.task_id), self._ttl_ms)
        if logged or measured:
            self._kept_at = time.monotonic()
        try:
            replies = await pipe.execute()
        except aioredis.RedisError as exc:
            log.warning("could not record events of task %s: %s", self.task_id, exc)
            return
        if newest_at is not None:
            newest = replies[newest_at]
            self._newest_ms = int((newest.decode() if isinstance(newest, bytes) else str(newest)).split("-")[0])

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._wake.set()
            await stopping.cancel(self._flusher)
        await self.flush()
        if self._kept_at is None or time.monotonic() - self._kept_at < 1.0:
            return  # nothing kept, or a write just set the countdown
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.pexpire(keys.task_logs(self.task_id), self._ttl_ms)
            pipe.pexpire(keys.task_metrics(self.task_id), self._ttl_ms)
            await pipe.execute()
        except aioredis.RedisError as exc:
            log.warning("could not set the retention of task %s's logs: %s", self.task_id, exc)


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
