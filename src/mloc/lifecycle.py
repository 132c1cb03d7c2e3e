"""Operations on tasks that several components share: cancel, requeue after worker loss, reaping."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

from mloc import keys
from mloc.errors import MlocError
from mloc.registry import WorkerRegistry
from mloc.state import TaskState
from mloc.store import TaskStore, Transition, require

log = logging.getLogger(__name__)


async def cancel(store: TaskStore, task_id: str, *, by: str) -> Transition:
    """Cancel a task in any non-terminal state.

    A pending or assigned task is cancelled at once (its capacity is released and a worker that
    later reads its assignment skips it). A running task is flagged; its worker stops the executor
    and records the cancellation.
    """
    record = await store.get(task_id, with_spec=False)
    if record.state.terminal:
        return require(Transition(False, error="state", detail=record.state.value), task_id, TaskState.CANCELLED)
    now = time.time()
    if record.children:
        # A replica group: cancel the shards, then the parent, which has no worker of its own.
        for child in record.children:
            with contextlib.suppress(MlocError):
                await cancel(store, child, by=by)
        outcome = await store.transition(
            task_id,
            TaskState.CANCELLED,
            sources=[TaskState.PENDING, TaskState.RUNNING],
            fields={"reason": f"cancelled by {by}", "reason_code": "cancelled_by_user", "finished_at": repr(now)},
            now=now,
        )
        return require(outcome, task_id, TaskState.CANCELLED)
    if record.state == TaskState.RUNNING:
        await store.set_fields(task_id, {"cancel_requested": "1", "cancel_requested_by": by})
        await store.redis.publish(keys.worker_control(record.worker_id or ""), json.dumps({"cancel": task_id}))
        return Transition(True, previous=record.state.value, attempt=record.attempts, state=TaskState.RUNNING)
    outcome = await store.transition(
        task_id,
        TaskState.CANCELLED,
        sources=[TaskState.PENDING, TaskState.ASSIGNED],
        release=True,
        fields={
            "reason": f"cancelled by {by}",
            "reason_code": "cancelled_by_user",
            "finished_at": repr(now),
            "pending_reason": "",
        },
        now=now,
    )
    if not outcome.ok and outcome.error == "state" and outcome.detail == TaskState.RUNNING:
        return await cancel(store, task_id, by=by)  # it started meanwhile
    return require(outcome, task_id, TaskState.CANCELLED)


async def requeue(
    store: TaskStore,
    task_id: str,
    *,
    worker_id: str,
    reason_code: str,
    reason: str,
    attempt: int | None = None,
) -> Transition:
    """Hand a task its worker can no longer run back to the scheduler, or fail it when its
    attempts are used up. Fenced on the worker (and the attempt when given), so a task already
    moved elsewhere is left alone."""
    h = await store.redis.hmget(keys.task(task_id), "priority", "created_ms", "attempts", "max_attempts", "state")
    priority, created_ms, attempts, max_attempts, state = h
    if state is None:
        return Transition(False, error="missing")
    started = state == TaskState.RUNNING
    used, limit = int(attempts or 0), int(max_attempts or 1)
    exhausted = started and used >= limit
    text = (
        f"{reason}; no retries left ({used} of {limit} attempts used)"
        if exhausted
        else f"{reason}; requeued ({used} of {limit} attempts used)"
    )
    return await store.transition(
        task_id,
        TaskState.PENDING,
        sources=[TaskState.ASSIGNED, TaskState.RUNNING],
        expect_worker=worker_id,
        expect_attempt=attempt,
        release=True,
        fail_when_attempts_used=started,
        priority=int(priority or 0),
        created_ms=int(created_ms or 0),
        fields={
            "reason": text,
            "reason_code": "retries_exhausted" if exhausted else reason_code,
            "pending_reason": "" if exhausted else "requeued: waiting for the scheduler",
            "worker_id": "",
            "cancel_requested": "",
            **({"finished_at": repr(time.time())} if exhausted else {}),
        },
    )


@dataclass
class ReapReport:
    lost_workers: list[str]
    requeued: list[str]
    failed: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return {"lost_workers": self.lost_workers, "requeued": self.requeued, "failed": self.failed}


async def reap(store: TaskStore, registry: WorkerRegistry, *, ttl_sec: float) -> ReapReport:
    """Mark workers silent for longer than ``ttl_sec`` as lost and requeue what they held.

    Safe to run from several orchestrators at once: marking is a compare-and-set, and requeueing
    is fenced on the worker id.
    """
    report = ReapReport([], [], [])
    for worker_id in await registry.stale(ttl_sec):
        if await registry.mark_lost(worker_id, ttl_sec):
            report.lost_workers.append(worker_id)
            log.warning("worker %s lost: no heartbeat for %.0fs", worker_id, ttl_sec)
        status = await store.redis.hget(keys.worker(worker_id), "status")
        if status != "lost":
            continue
        for task_id in await registry.task_ids(worker_id):
            outcome = await requeue(
                store,
                task_id,
                worker_id=worker_id,
                reason_code="worker_lost",
                reason=f"worker {worker_id} lost (no heartbeat for {ttl_sec:.0f}s)",
            )
            if outcome.ok:
                (report.failed if outcome.state == TaskState.FAILED else report.requeued).append(task_id)
            else:
                await store.redis.srem(keys.worker_tasks(worker_id), task_id)
        await store.redis.delete(keys.worker_stream(worker_id))
    return report
