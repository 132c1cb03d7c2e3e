"""Operations on tasks that several components share: cancel, requeue with backoff after worker loss
or an executor crash, reaping lost workers, and forgetting tasks past their retention."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mloc import keys
from mloc.errors import MlocError
from mloc.state import TERMINAL, TaskState
from mloc.store import TaskStore, Transition, require
from mloc.workers import WorkerRegistry

log = logging.getLogger(__name__)
# A retry waits up to this fraction longer than its backoff, so tasks that failed together do not
# all come back in the same instant.
BACKOFF_JITTER = 0.1


@dataclass(frozen=True)
class Backoff:
    """How long retry ``n`` waits before it may be placed: ``base_sec * 2**(n-1)``, at most
    ``max_sec``, plus up to 10% jitter. A base of 0 retries at once."""

    base_sec: float = 5.0
    max_sec: float = 300.0

    def delay(self, retry: int) -> float:
        if self.base_sec <= 0 or self.max_sec <= 0 or retry < 1:
            return 0.0
        wait = min(self.max_sec, self.base_sec * 2.0 ** min(retry - 1, 64))
        return wait * (1.0 + random.uniform(0.0, BACKOFF_JITTER))


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


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


def _consumed(usage: Mapping[str, float] | None) -> dict[str, float] | None:
    """Usage counters without the task counts: a retried attempt used resources but ended no task."""
    if not usage:
        return None
    return {name: value for name, value in usage.items() if not name.startswith(("tasks", "state."))} or None


async def requeue(
    store: TaskStore,
    task_id: str,
    *,
    worker_id: str,
    reason_code: str,
    reason: str,
    attempt: int | None = None,
    backoff: Backoff | None = None,
    exhausted_code: str = "retries_exhausted",
    final_usage: Mapping[str, float] | None = None,
    owner: str | None = None,
) -> Transition:
    """Hand a task its worker can no longer run back to the scheduler, or fail it when its
    attempts are used up. Fenced on the worker (and the attempt when given), so a task already
    moved elsewhere is left alone.

    A task that had started is a retry: it waits out its backoff (the task's own policy stored at
    submit, else ``backoff``) in the retry index before the scheduler may place it again. A task
    handed back before it started was never tried, so it is placeable at once. ``final_usage`` (the
    attempt's daily usage counters) is recorded for ``owner``: whole when this ends the task, only what
    the attempt consumed (time, GPU-seconds, tokens) when the task is tried again."""
    h = await store.redis.hmget(
        keys.task(task_id),
        "priority",
        "created_ms",
        "attempts",
        "max_attempts",
        "state",
        "retry_backoff_sec",
        "retry_backoff_max_sec",
    )
    priority, created_ms, attempts, max_attempts, state, base_sec, max_sec = h
    if state is None:
        return Transition(False, error="missing")
    started = state == TaskState.RUNNING
    used, limit = int(attempts or 0), int(max_attempts or 1)
    exhausted = started and used >= limit
    now = time.time()
    retry_at = None
    if started and not exhausted:
        default = backoff or Backoff()
        base, most = _float(base_sec), _float(max_sec)
        policy = Backoff(default.base_sec if base is None else base, default.max_sec if most is None else most)
        wait = policy.delay(used)
        retry_at = now + wait if wait > 0 else None
    if exhausted:
        text = f"{reason}; no retries left ({used} of {limit} attempts used)"
        waiting = ""
    else:
        text = f"{reason}; requeued ({used} of {limit} attempts used)"
        waiting = f"retry {used} of {limit - 1} after {reason}" if started else "requeued: waiting for the scheduler"
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
        retry_at=retry_at,
        usage=final_usage if exhausted else _consumed(final_usage),
        owner=owner,
        fields={
            "reason": text,
            "reason_code": exhausted_code if exhausted else reason_code,
            "pending_reason": waiting,
            "worker_id": "",
            "cancel_requested": "",
            **({"finished_at": repr(now)} if exhausted else {}),
        },
        now=now,
    )


@dataclass
class ReapReport:
    lost_workers: list[str]
    requeued: list[str]
    failed: list[str]
    forgotten: int = 0  # finished tasks removed past MLOC_TASK_RETENTION_SEC

    def to_dict(self) -> dict[str, Any]:
        return {
            "lost_workers": self.lost_workers,
            "requeued": self.requeued,
            "failed": self.failed,
            "forgotten_tasks": self.forgotten,
        }


async def reap(
    store: TaskStore, registry: WorkerRegistry, *, ttl_sec: float, backoff: Backoff | None = None
) -> ReapReport:
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
                backoff=backoff,
            )
            if outcome.ok:
                (report.failed if outcome.state == TaskState.FAILED else report.requeued).append(task_id)
            else:
                await store.redis.srem(keys.worker_tasks(worker_id), task_id)
        await store.redis.delete(keys.worker_stream(worker_id))
    return report


async def forget_finished(
    store: TaskStore, *, older_than_sec: float, now: float | None = None, limit: int = 1000
) -> list[str]:
    """Remove tasks that ended more than ``older_than_sec`` ago: record, result, logs, metrics and
    their index entries. At most ``limit`` per call, so one reaper round stays short.

    The state indexes are scored by creation time, and a task ends after it was created, so only
    tasks created before the cut-off can qualify; of those, the ones that ended later are kept.
    Idempotent, so several orchestrators may run it at once.
    """
    now = time.time() if now is None else now
    cutoff = now - older_than_sec
    removed: list[str] = []
    batch = 500
    for state in sorted(TERMINAL):
        index = keys.tasks_in_state(state)
        offset = 0
        while len(removed) < limit:
            ids = await store.redis.zrangebyscore(index, "-inf", int(cutoff * 1000), start=offset, num=batch)
            if not ids:
                break
            pipe = store.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(keys.task(task_id), "owner", "finished_at", "updated_at", "state")
            old: list[tuple[str, str]] = []
            for task_id, (owner, finished_at, updated_at, current) in zip(ids, await pipe.execute(), strict=True):
                ended = _float(finished_at) or _float(updated_at)
                if current is None or (current == state and ended is not None and ended < cutoff):
                    old.append((task_id, owner or ""))
            old = old[: limit - len(removed)]
            if old:
                drop = store.redis.pipeline(transaction=True)
                for task_id, owner in old:
                    drop.delete(
                        keys.task(task_id),
                        keys.task_result(task_id),
                        keys.task_logs(task_id),
                        keys.task_metrics(task_id),
                    )
                    drop.zrem(keys.TASKS_ALL, task_id)
                    drop.zrem(index, task_id)
                    if owner:
                        drop.zrem(keys.tasks_of_owner(owner), task_id)
                await drop.execute()
                removed.extend(task_id for task_id, _ in old)
            # Entries removed shift the rest forward; those kept are stepped over.
            offset += len(ids) - len(old)
            if len(ids) < batch:
                break
    if removed:
        log.info("removed %d task(s) that ended more than %.0fs ago", len(removed), older_than_sec)
    return removed
