"""Where a waiting task stands in the queue, and about when it starts.

The estimate replays the queue on the workers that could run the task: each of their slots frees when
the task on it ends (its progress ETA, else the usual duration of its kind less the time it has run),
the tasks ahead of it take the next free slots for their usual durations, and the task starts on the
slot that frees next after them. A kind's usual duration is the median of the recent successes of the
same task type, model and topic (``DurationHistory``, read from the succeeded tasks' index and kept
for a short while). It is an estimate: fair share between users may let another user's later task go
first, and a worker that joins or leaves changes it.
"""

from __future__ import annotations

import heapq
import json
import statistics
import time
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
    store: TaskStore, history: DurationHistory, views: list[WorkerView], task_id: str, req: dict[str, Any]
) -> Estimate:
    """The queue position and start estimate of the pending task ``task_id`` (whose request is ``req``)."""
    redis = store.redis
    rank = await redis.zrank(keys.PENDING, task_id)
    request = Request.from_json(req)
    fitting = [v for v in views if v.status == WorkerStatus.ACTIVE and fits_registration(request, v)]
    if not fitting:
        return Estimate(None if rank is None else rank + 1, 0, None, "no registered worker can run it")
    now = time.time()
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
        slots += sorted(busy)[: view.slots_total] + [0.0] * max(0, view.slots_total - len(busy))
    if not slots:
        return Estimate(None if rank is None else rank + 1, 0, None, "its workers have no slots")
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
    return Estimate(None if rank is None else rank + 1, ahead, start, basis)
