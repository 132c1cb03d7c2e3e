"""The reaper: workers that stopped heartbeating are declared lost and their tasks handed back, and
finished tasks past their retention are forgotten. Runs in the orchestrator, every reap interval."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from mloc import keys, removals
from mloc.records import WorkerStatus
from mloc.requeue import DEFAULT_MAX_REQUEUES, Backoff, hand_back, seconds
from mloc.state import TERMINAL, Reason
from mloc.store import TaskStore
from mloc.workers import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    lost_workers: list[str]
    requeued: list[str]
    failed: list[str]
    cancelled: list[str] = field(default_factory=list)  # they were being cancelled when it was lost
    forgotten: int = 0  # finished tasks removed past MLOC_TASK_RETENTION_SEC

    def to_dict(self) -> dict[str, Any]:
        return {
            "lost_workers": self.lost_workers,
            "requeued": self.requeued,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "forgotten_tasks": self.forgotten,
        }


async def reap(
    store: TaskStore,
    registry: WorkerRegistry,
    *,
    ttl_sec: float,
    backoff: Backoff | None = None,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    redis_calm_sec: float | None = None,
) -> ReapReport:
    """Mark workers silent for longer than ``ttl_sec`` as lost and hand back what they held.

    A worker's silence is not counted while Redis could not take its heartbeats: none is marked until
    ``redis_calm_sec`` (how long Redis has been up and reachable: see :func:`redis_calm_sec`) reaches
    ``ttl_sec``. Otherwise, when Redis came back after an outage longer than that, every worker would be
    declared lost at once and its running tasks stopped.

    Safe to run from several orchestrators at once: marking is a compare-and-set, and requeueing
    is fenced on the worker id.
    """
    report = ReapReport([], [], [])
    calm = float("inf") if redis_calm_sec is None else redis_calm_sec
    stale = await registry.stale(ttl_sec)
    if stale and calm < ttl_sec:
        log.info(
            "%d worker(s) silent, but Redis was away until %.0fs ago: they get HEARTBEAT_TTL_SEC (%.0fs) from "
            "then to heartbeat before any is declared lost",
            len(stale),
            calm,
            ttl_sec,
        )
        stale = []
    for worker_id in stale:
        if await registry.mark_lost(worker_id, ttl_sec):
            report.lost_workers.append(worker_id)
            log.warning(
                "worker %s lost: no heartbeat for %.0fs%s",
                worker_id,
                ttl_sec,
                await _beats_too_slowly(registry, worker_id, ttl_sec),
            )
        status = await store.redis.hget(keys.worker(worker_id), "status")
        if status != WorkerStatus.LOST:
            continue
        handed = await hand_back(
            store,
            worker_id,
            reason_code=Reason.WORKER_LOST,
            reason=f"worker {worker_id} lost (no heartbeat for {ttl_sec:.0f}s)",
            backoff=backoff,
            max_requeues=max_requeues,
        )
        report.requeued.extend(handed.requeued)
        report.failed.extend(handed.failed)
        report.cancelled.extend(handed.cancelled)
    return report


async def redis_calm_sec(store: TaskStore, trouble_sec: float | None) -> float:
    """How long Redis has taken heartbeats: since it started (while it was down it took none), and
    since this orchestrator last failed to reach it (``trouble_sec`` ago; None: never). Unbounded where
    neither says (INFO refused by the server's ACL, no trouble seen)."""
    try:
        info = await store.redis.info("server")
        uptime = float(info.get("uptime_in_seconds", float("inf")))
    except ResponseError:
        uptime = float("inf")
    return min(uptime, float("inf") if trouble_sec is None else trouble_sec)


async def _beats_too_slowly(registry: WorkerRegistry, worker_id: str, ttl_sec: float) -> str:
    """What to change when the worker's own heartbeat interval is not shorter than the TTL: it is then
    declared lost between two beats, and its tasks bounce from worker to worker."""
    stated = await registry.redis.hget(keys.worker(worker_id), "heartbeat_interval_sec")
    try:
        interval = float(stated or 0)
    except ValueError:
        return ""
    if interval < ttl_sec:
        return ""
    return (
        f"; it heartbeats only every {interval:g}s (its HEARTBEAT_INTERVAL_SEC), not within this orchestrator's "
        f"HEARTBEAT_TTL_SEC ({ttl_sec:g}s): set HEARTBEAT_TTL_SEC to at least three intervals ({3 * interval:g}s)"
    )


async def forget_finished(
    store: TaskStore, *, older_than_sec: float, now: float | None = None, limit: int = 1000
) -> list[str]:
    """Remove tasks that ended more than ``older_than_sec`` ago: record, result, logs, metrics and
    their index entries, listing each on the removals stream so its result folders go too
    (:mod:`mloc.removals`). At most ``limit`` per call, so one reaper round stays short.

    The state indexes are scored by creation time, and a task ends after it was created, so only
    tasks created before the cut-off can qualify; of those, the ones that ended later are kept.
    Idempotent, so several orchestrators may run it at once.
    """
    now = time.time() if now is None else now
    cutoff = now - older_than_sec
    removed: list[str] = []
    pipelines: set[str] = set()
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
                pipe.hmget(keys.task(task_id), "owner", "finished_at", "updated_at", "state", "pipeline_id")
            old: list[tuple[str, str]] = []
            for task_id, (owner, finished_at, updated_at, current, pipeline_id) in zip(
                ids, await pipe.execute(), strict=True
            ):
                ended = seconds(finished_at) or seconds(updated_at)
                if current is None or (current == state and ended is not None and ended < cutoff):
                    old.append((task_id, owner or ""))
                    if pipeline_id:
                        pipelines.add(pipeline_id)
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
                    drop.zrem(keys.TASKS_CHILDREN, task_id)
                    # Its result folders go from every disk that holds one (mloc.removals).
                    drop.xadd(keys.TASKS_REMOVED, {"task": task_id}, maxlen=removals.KEPT, approximate=True)
                    drop.zrem(index, task_id)
                    if owner:
                        drop.zrem(keys.tasks_of_owner(owner), task_id)
                        drop.zrem(keys.children_of_owner(owner), task_id)
                await drop.execute()
                removed.extend(task_id for task_id, _ in old)
            # Entries removed shift the rest forward; those kept are stepped over.
            offset += len(ids) - len(old)
            if len(ids) < batch:
                break
    if removed:
        log.info("removed %d task(s) that ended more than %.0fs ago", len(removed), older_than_sec)
    await _forget_pipelines(store, pipelines)
    return removed


async def _forget_pipelines(store: TaskStore, pipeline_ids: set[str]) -> None:
    """Remove the graphs (and their index entries) of pipelines none of whose tasks is left: a
    pipeline lives as long as its last task. One that still has a task is looked at again when that
    task is removed."""
    for pipeline_id in sorted(pipeline_ids):
        raw = await store.redis.get(keys.pipeline(pipeline_id))
        if raw is None:
            continue
        graph = json.loads(raw)
        task_ids = [node["task_id"] for node in graph.get("tasks", [])]
        if task_ids and await store.redis.exists(*(keys.task(task_id) for task_id in task_ids)):
            continue
        drop = store.redis.pipeline(transaction=True)
        drop.delete(keys.pipeline(pipeline_id))
        drop.zrem(keys.PIPELINES, pipeline_id)
        drop.zrem(keys.pipelines_of_owner(graph.get("owner", "")), pipeline_id)
        await drop.execute()
