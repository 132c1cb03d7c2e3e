"""Where a waiting task stands in the queue, and about when it starts.

The estimate replays the queue on the workers that could run the task: each of their slots frees when
the task on it ends (its progress ETA, else the usual duration of its kind less the time it has run),
the tasks ahead of it take the next free slots for their usual durations, and the task starts on the
slot that frees next after them. A kind's usual duration is the median of the recent successes of the
same task type, model and topic (``DurationHistory``, read from the succeeded tasks' index and kept
for a short while). A backfill hold (:mod:`.backfill`) counts: the task it is for starts when its held
worker frees enough for it (the hold's shadow time, worked out from what the task needs, not from
slots alone), and a task the hold keeps off that worker cannot take its slots before then. A task that
needs more than a slot (GPUs, CPU, memory) starts no sooner than the tasks running now, ending as
expected, leave that much free on one of its workers (``Room``, worked out as a shadow time). It is an
estimate: fair share between users may let another user's later task go
first, and a worker that joins or leaves changes it.
"""

from __future__ import annotations

import heapq
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mloc import keys
from mloc.orchestrator.placement import Request, fits_registration
from mloc.records import WorkerStatus, WorkerView
from mloc.state import TaskState
from mloc.store import TaskStore

# Recent successes read per refresh, and how long the medians are kept.
HISTORY_TASKS = 500
HISTORY_TTL_SEC = 30.0
# Tasks ahead looked at, at most (an estimate for a task behind more says at least this long).
AHEAD_LIMIT = 2000
# The duration assumed for a kind with no success yet.
UNKNOWN_DURATION_SEC = 60.0


def kind_of(req: dict[str, Any]) -> str:
    return f"{req.get('task_type', '')}|{req.get('model') or ''}|{req.get('topic', '')}"


class DurationHistory:
    """Median run time of recent successes, by task type, model and topic."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._medians: dict[str, float] = {}
        self._by_type: dict[str, float] = {}
        self._read_at = 0.0

    async def duration(self, req: dict[str, Any]) -> tuple[float, str]:
        """The usual run time of ``req``'s kind, and what it is based on."""
        if time.monotonic() - self._read_at > HISTORY_TTL_SEC:
            await self._refresh()
        kind = kind_of(req)
        if kind in self._medians:
            return self._medians[kind], "history"
        task_type = str(req.get("task_type", ""))
        if task_type in self._by_type:
            return self._by_type[task_type], "history of its task type"
        return UNKNOWN_DURATION_SEC, "no history"

    async def _refresh(self) -> None:
        ids = await self.store.redis.zrevrange(keys.tasks_in_state(TaskState.SUCCEEDED), 0, HISTORY_TASKS - 1)
        pipe = self.store.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(keys.task(task_id), "req", "started_at", "finished_at", "group_size", "assigned_at")
        runs: dict[str, list[float]] = {}
        by_type: dict[str, list[float]] = {}
        for raw, started, finished, group, assigned in await pipe.execute():
            if not raw or not started or not finished or group:
                continue  # a group's parent has no run of its own
            req = json.loads(raw)
            # A slot is busy from the task's placement to its end, not only while it runs.
            took = max(0.0, float(finished) - float(assigned or started))
            runs.setdefault(kind_of(req), []).append(took)
            by_type.setdefault(str(req.get("task_type", "")), []).append(took)
        self._medians = {kind: statistics.median(values) for kind, values in runs.items()}
        self._by_type = {kind: statistics.median(values) for kind, values in by_type.items()}
        self._read_at = time.monotonic()


@dataclass(frozen=True)
class HeldWorker:
    """The backfill hold (:mod:`.backfill`) as it bears on one waiting task's start."""

    worker_id: str
    free_at: float | None  # the shadow time (unix seconds): when the held task can start; None if unknown
    mine: bool  # the worker is held for this task
    keeps_off: bool  # this task may not start on the held worker before the held task has


@dataclass(frozen=True)
class Room:
    """The first moment the tasks running now, ending as expected, leave enough of one worker free for
    a waiting task (its GPUs, CPU, memory and a slot), whatever is queued ahead of it."""

    worker_id: str
    at: float | None  # unix seconds; None when it waits for a task whose end nothing says
    short: str  # what it lacks now, "3 GPUs"
    unknown_end: str | None  # the task with no known end that it waits for, if any


# Where and when a waiting task first finds room among the workers given, if anywhere.
RoomFinder = Callable[[list[WorkerView]], Awaitable[Room | None]]


@dataclass
class Estimate:
    position: int | None  # 1-based place in the pending order; None while a retry waits out its backoff
    ahead: int  # placeable tasks before it that the same workers could run
    eta_sec: float | None  # seconds from now until it starts; None when no worker could run it
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "ahead": self.ahead,
            "eta_sec": None if self.eta_sec is None else round(self.eta_sec, 1),
            "basis": self.basis,
        }


async def estimate(
    store: TaskStore,
    history: DurationHistory,
    views: list[WorkerView],
    task_id: str,
    req: dict[str, Any],
    hold: HeldWorker | None = None,
    room_for: RoomFinder | None = None,
) -> Estimate:
    """The queue position and start estimate of the pending task ``task_id`` (whose request is ``req``);
    ``hold``: how a backfill hold bears on it; ``room_for``: when its workers first have room for it."""
    redis = store.redis
    rank = await redis.zrank(keys.PENDING, task_id)
    position = None if rank is None else rank + 1
    request = Request.from_json(req)
    fitting = [v for v in views if v.status == WorkerStatus.ACTIVE and fits_registration(request, v)]
    if not fitting:
        return Estimate(position, 0, None, "no registered worker can run it")
    now = time.time()
    if hold is not None and hold.mine and hold.free_at is not None:
        # The hold was placed where it starts soonest, from what it needs (GPUs, memory), not slots alone.
        return Estimate(position, 0, max(0.0, hold.free_at - now), f"the worker held for it, {hold.worker_id}")
    # Every slot of the fitting workers, as the seconds until it frees.
    slots: list[float] = []
    pipe = redis.pipeline(transaction=False)
    for view in fitting:
        pipe.smembers(keys.worker_tasks(view.worker_id))
    holdings = await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for held in holdings:
        for held_id in held:
            pipe.hmget(keys.task(held_id), "req", "assigned_at", "progress")
    rows = iter(await pipe.execute())
    for view, held in zip(fitting, holdings, strict=True):
        busy = []
        for _ in held:
            raw, assigned, progress = next(rows)
            remaining = None
            if progress:
                remaining = json.loads(progress).get("eta_sec")
            if remaining is None:
                usual, _ = await history.duration(json.loads(raw or "{}"))
                remaining = max(0.0, usual - (now - float(assigned))) if assigned else usual
            busy.append(float(remaining))
        frees = sorted(busy)[: view.slots_total] + [0.0] * max(0, view.slots_total - len(busy))
        if hold is not None and hold.keeps_off and view.worker_id == hold.worker_id:
            if hold.free_at is None:
                continue  # not before the held task starts, and when that is nobody knows
            frees = [max(free, hold.free_at - now) for free in frees]
        slots += frees
    if not slots:
        why = "its workers have no slots"
        if hold is not None and hold.keeps_off:
            why = f"its only worker, {hold.worker_id}, is held for an older task whose start is unknown"
        return Estimate(position, 0, None, why)
    heapq.heapify(slots)
    ahead_ids = await redis.zrange(keys.PENDING, 0, min(rank, AHEAD_LIMIT) - 1) if rank else []
    pipe = redis.pipeline(transaction=False)
    for ahead_id in ahead_ids:
        pipe.hget(keys.task(ahead_id), "req")
    ahead = 0
    for raw in await pipe.execute():
        other = json.loads(raw or "{}")
        if not other or not any(fits_registration(Request.from_json(other), view) for view in fitting):
            continue  # it runs elsewhere
        usual, _ = await history.duration(other)
        heapq.heappush(slots, heapq.heappop(slots) + usual)
        ahead += 1
    start = heapq.heappop(slots)
    _, basis = await history.duration(req)
    if rank is None:
        retry_at = await redis.zscore(keys.RETRY_WAIT, task_id)
        if retry_at is not None:
            start = max(start, float(retry_at) - now)
        basis += "; a retry waiting out its backoff"
    if hold is not None and hold.keeps_off:
        basis += f"; not on {hold.worker_id} before the older task held there starts"
    elif hold is not None and hold.mine:
        basis += f"; {hold.worker_id} is held for it, its start unknown"
    room = await room_for(fitting) if room_for is not None else None
    if room is not None:
        if room.at is None:
            waits = f"{room.short} on {room.worker_id} wait for {room.unknown_end}"
            basis += f"; at the earliest: {waits}, whose end nothing says"
        else:
            at = room.at
            if hold is not None and hold.keeps_off and room.worker_id == hold.worker_id and hold.free_at is not None:
                at = max(at, hold.free_at)
            if at - now > start:
                start = at - now
                basis += f"; {room.short} free on {room.worker_id} then, as its tasks end"
    return Estimate(position, ahead, start, basis)
