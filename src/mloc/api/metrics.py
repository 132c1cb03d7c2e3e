"""GET /metrics: the cluster's state for Prometheus, and the API's own request latency.

The cluster figures (tasks by state, queue depth, workers, each worker's heartbeat age, GPUs, today's
usage, submit-to-start wait, the tasks ended since the cluster began, and for autoscalers the demand
waiting tasks put on each worker shape) are read from Redis at scrape time, so every orchestrator
replica answers the same numbers and nothing is kept in memory between scrapes. The ended tasks are a
counter kept in Redis by the transition script (``keys.TASK_OUTCOMES``), so it never goes down when an
orchestrator restarts, and counts the ends every process made. The request-latency histogram is per
process: with several orchestrators, scrape each one and sum.

/metrics needs no token (Prometheus scrapes without one); it shows counts, GPU models, worker states
and the task types and topics of waiting work, never task contents. Keep the port on a private
network or put the endpoint behind a proxy where that is too much.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mloc import __version__, keys
from mloc.orchestrator.demand import NO_GPU, Demand, read_demand
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.records import WorkerRecord, WorkerStatus
from mloc.state import TaskState

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

# Bounds on what one scrape reads, so a large or busy cluster cannot make /metrics slow.
WAIT_SAMPLE = 1000  # newest started tasks the submit-to-start histogram is computed from
MAX_WORKERS = 5000  # workers read per scrape (most recent heartbeat first)
MAX_OWNERS = 10_000  # users whose usage of today is summed
MAX_DEMAND_TASKS = 50_000  # waiting tasks whose request is read for the pending-demand gauges
SCRAPE_TIMEOUT_SEC = 5.0  # past this the scrape fails (503) rather than piling up behind a stuck Redis

# The stored statuses, each with a series even at zero.
WORKER_STATUSES = tuple(s.value for s in WorkerStatus if s not in (WorkerStatus.UNRESPONSIVE, WorkerStatus.UNKNOWN))
USAGE_FIELDS = (
    "tasks",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "train_samples",
    "train_tokens",
    "gpu_seconds",
    "wall_sec",
)
# States whose tasks may have started; their records carry started_at once they did.
STARTED_STATES = (
    TaskState.RUNNING,
    TaskState.CANCELLING,
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.CANCELLED,
)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The series autoscalers query (deploy/k8s/components/keda); tests check those queries against SERIES.
PENDING_DEMAND_TASKS = "mloc_pending_demand_tasks"
PENDING_DEMAND_GPUS = "mloc_pending_demand_gpus"
PENDING_DEMAND_TRUNCATED = "mloc_pending_demand_truncated"
PENDING_HELD = "mloc_pending_held_tasks"
BUSY_WORKERS = "mloc_busy_workers"
HEARTBEAT_AGE = "mloc_worker_heartbeat_age_seconds"
TASK_OUTCOMES = "mloc_task_outcomes"  # a counter: exported as mloc_task_outcomes_total
BUILD = "mloc_build"  # an info metric: exported as mloc_build_info{version="..."} 1
# The end states a task's outcome is counted in, each with a series for every task type seen.
OUTCOMES = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
# Every family this endpoint exports, with its label names (histograms add "le" to their buckets).
SERIES: dict[str, tuple[str, ...]] = {
    "mloc_tasks": ("state",),
    "mloc_queue_depth": (),
    "mloc_workers": ("status",),
    HEARTBEAT_AGE: ("worker",),
    "mloc_gpus": ("model", "state"),
    BUSY_WORKERS: ("model",),
    "mloc_worker_slots": ("state",),
    "mloc_usage_today": ("counter",),
    PENDING_DEMAND_TASKS: ("gpu_type", "gpu_count", "task_type", "topic"),
    PENDING_DEMAND_GPUS: ("gpu_type", "task_type", "topic"),
    PENDING_DEMAND_TRUNCATED: (),
    PENDING_HELD: (),
    "mloc_task_wait_seconds": (),
    TASK_OUTCOMES: ("task_type", "state"),
    f"{BUILD}_info": ("version",),
    "mloc_metrics_read_seconds": (),
    "mloc_metrics_truncated": ("part",),
    "mloc_http_request_duration_seconds": ("method", "route", "status"),
}


@dataclass
class ClusterSnapshot:
    """What one scrape read from Redis."""

    tasks_by_state: dict[str, int]
    queue_depth: int
    workers: list[WorkerRecord]
    usage_today: dict[str, float]
    waits: list[float]
    read_sec: float
    truncated: dict[str, bool] = field(default_factory=dict)
    demand: Demand = field(default_factory=Demand)
    # keys.TASK_OUTCOMES as stored: "<state>:<task type>" -> tasks that entered that end state
    outcomes: dict[str, str] = field(default_factory=dict)


async def read_snapshot(orch: Orchestrator) -> ClusterSnapshot:
    """Read every figure /metrics shows, each with a bounded number of Redis calls."""
    started = time.perf_counter()
    redis = orch.redis
    truncated: dict[str, bool] = {}

    pipe = redis.pipeline(transaction=False)
    for state in TaskState:
        pipe.zcard(keys.tasks_in_state(state))
    pipe.zcard(keys.PENDING)
    pipe.zcard(keys.WORKERS)
    pipe.zrevrange(keys.WORKERS, 0, MAX_WORKERS - 1)
    pipe.scard(keys.USAGE_OWNERS)
    pipe.hgetall(keys.TASK_OUTCOMES)
    for state in STARTED_STATES:
        pipe.zrevrange(keys.tasks_in_state(state), 0, WAIT_SAMPLE - 1, withscores=True)
    replies = await pipe.execute()
    counts = replies[: len(TaskState)]
    queue_depth, worker_total, worker_ids, owner_total, outcomes, *recent = replies[len(TaskState) :]
    tasks_by_state = {state.value: int(n) for state, n in zip(TaskState, counts, strict=True)}
    truncated["workers"] = int(worker_total) > len(worker_ids)

    workers = await orch.registry.records(list(worker_ids))

    owners = await _owners(redis, int(owner_total))
    truncated["usage"] = int(owner_total) > len(owners)
    usage_today = await _usage_today(redis, owners)

    # The state indexes are scored by creation time, so the newest WAIT_SAMPLE tasks across them are
    # the ones submitted most recently; those that started give the current submit-to-start wait.
    newest = sorted((pair for rows in recent for pair in rows), key=lambda pair: pair[1], reverse=True)
    waits = await _waits(redis, [task_id for task_id, _ in newest[:WAIT_SAMPLE]])
    demand = await read_demand(redis, limit=MAX_DEMAND_TASKS)

    return ClusterSnapshot(
        tasks_by_state=tasks_by_state,
        queue_depth=int(queue_depth),
        workers=workers,
        usage_today=usage_today,
        waits=waits,
        read_sec=time.perf_counter() - started,
        truncated=truncated,
        demand=demand,
        outcomes=outcomes,
    )


async def _owners(redis: Any, total: int) -> list[str]:
    if total <= MAX_OWNERS:
        return sorted(await redis.smembers(keys.USAGE_OWNERS))
    log.warning("/metrics sums today's usage of %d of %d users (MAX_OWNERS)", MAX_OWNERS, total)
    owners: list[str] = []
    async for owner in redis.sscan_iter(keys.USAGE_OWNERS, count=1000):
        owners.append(owner)
        if len(owners) >= MAX_OWNERS:
            break
    return owners


async def _usage_today(redis: Any, owners: list[str]) -> dict[str, float]:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    pipe = redis.pipeline(transaction=False)
    for owner in owners:
        pipe.hmget(keys.usage_day(owner, day), list(USAGE_FIELDS))
    totals = dict.fromkeys(USAGE_FIELDS, 0.0)
    rows = await pipe.execute() if owners else []
    for values in rows:
        for name, value in zip(USAGE_FIELDS, values, strict=True):
            if value is not None:
                totals[name] += float(value)
    return totals


async def _waits(redis: Any, task_ids: list[str]) -> list[float]:
    if not task_ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hmget(keys.task(task_id), ["created_at", "started_at"])
    waits = []
    for created, begun in await pipe.execute():
        if created and begun:
            waits.append(max(0.0, float(begun) - float(created)))
    return waits


# The snapshot of the scrape being answered. prometheus_client calls collect() synchronously while the
# Redis client is async, so the endpoint reads first and the collector formats what it read; a context
# variable keeps concurrent scrapes from seeing each other's snapshot.
_current: ContextVar[ClusterSnapshot | None] = ContextVar("mloc_metrics_snapshot", default=None)


class ClusterCollector(Collector):
    """Turns the current scrape's Redis snapshot into metric families."""

    def collect(self) -> Iterable[Metric]:
        snapshot = _current.get()
        if snapshot is None:
            return []
        return list(_families(snapshot))


def _families(snap: ClusterSnapshot) -> Iterator[Metric]:
    tasks = GaugeMetricFamily("mloc_tasks", "Tasks by state.", labels=["state"])
    for state, count in snap.tasks_by_state.items():
        tasks.add_metric([state], count)
    yield tasks

    yield GaugeMetricFamily(
        "mloc_queue_depth", "Tasks waiting for placement (pending, not yet on a worker).", value=snap.queue_depth
    )

    statuses = Counter({status: 0 for status in WORKER_STATUSES})
    statuses.update(worker.status for worker in snap.workers)
    workers = GaugeMetricFamily("mloc_workers", "Registered workers by status.", labels=["status"])
    for status, count in sorted(statuses.items()):
        workers.add_metric([status], count)
    yield workers
    yield _heartbeat_ages(snap.workers)

    gpus = GaugeMetricFamily(
        "mloc_gpus",
        "GPUs by model: total on registered workers that are not lost or offline, free on active workers.",
        labels=["model", "state"],
    )
    total: Counter[str] = Counter()
    free: Counter[str] = Counter()
    slots = {"total": 0, "free": 0}
    for worker in snap.workers:
        if worker.status in (WorkerStatus.LOST, WorkerStatus.OFFLINE):
            continue
        free_indexes = set(worker.free.get("gpus", []))
        for gpu in worker.hardware.get("gpus", []):
            model = str(gpu.get("name") or "unknown")
            total[model] += 1
            if worker.status == WorkerStatus.ACTIVE and gpu.get("index") in free_indexes:
                free[model] += 1
        slots["total"] += int(worker.capacity.get("slots", 0))
        if worker.status == WorkerStatus.ACTIVE:
            slots["free"] += int(worker.free.get("slots", 0))
    for model in sorted(total):
        gpus.add_metric([model, "total"], total[model])
        gpus.add_metric([model, "free"], free[model])
    yield gpus

    slot_family = GaugeMetricFamily(
        "mloc_worker_slots",
        "Task slots on workers that are not lost or offline; free on active ones.",
        labels=["state"],
    )
    for state, count in slots.items():
        slot_family.add_metric([state], count)
    yield slot_family

    yield _busy_workers(snap.workers)
    yield from _demand(snap.demand)

    usage = GaugeMetricFamily(
        "mloc_usage_today",
        "Today's (UTC) usage counters summed over users; they restart at midnight UTC.",
        labels=["counter"],
    )
    for name, value in snap.usage_today.items():
        usage.add_metric([name], value)
    yield usage

    yield _wait_histogram(snap.waits)
    yield _outcomes(snap.outcomes)
    yield InfoMetricFamily(BUILD, "The MLOC version this orchestrator runs.", value={"version": __version__})

    yield GaugeMetricFamily(
        "mloc_metrics_read_seconds", "Time this scrape spent reading Redis.", value=round(snap.read_sec, 6)
    )
    truncated = GaugeMetricFamily(
        "mloc_metrics_truncated", "1 when this scrape read only part of a large set (see MAX_*).", labels=["part"]
    )
    for part, cut in sorted(snap.truncated.items()):
        truncated.add_metric([part], 1.0 if cut else 0.0)
    yield truncated


def _heartbeat_ages(workers: list[WorkerRecord]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        HEARTBEAT_AGE,
        "Seconds since each worker's last heartbeat (its clock's time of sending, against this orchestrator's "
        "clock at the scrape, as the reaper judges it); workers that stopped cleanly (offline) are left out. "
        "Past HEARTBEAT_TTL_SEC the reaper declares a worker lost.",
        labels=list(SERIES[HEARTBEAT_AGE]),
    )
    for worker in sorted(workers, key=lambda w: w.worker_id):
        if worker.status != WorkerStatus.OFFLINE and worker.heartbeat_age_sec is not None:
            family.add_metric([worker.worker_id], max(0.0, worker.heartbeat_age_sec))
    return family


def _outcomes(stored: dict[str, str]) -> CounterMetricFamily:
    counts: dict[tuple[str, str], float] = {}
    for name, count in stored.items():
        state, _, task_type = name.partition(":")
        key = (task_type or "unknown", state)
        counts[key] = counts.get(key, 0.0) + float(count)
    family = CounterMetricFamily(
        TASK_OUTCOMES,
        "Tasks that ended, by task type and end state, since the cluster's Redis began: counted by whichever "
        "process ended them, kept in Redis, so it does not reset when an orchestrator restarts. A task resumed "
        "after it ended counts again when it ends again; a replica group's or dataset task's parent counts as "
        "well as its shards or chunks.",
        labels=list(SERIES[TASK_OUTCOMES]),
    )
    # Every end state of each task type seen, zero where none yet, so a rate has a series from the start.
    for task_type in sorted({task_type for task_type, _ in counts}):
        for state in OUTCOMES:
            family.add_metric([task_type, state.value], counts.get((task_type, state.value), 0.0))
    return family


def _busy_workers(workers: list[WorkerRecord]) -> GaugeMetricFamily:
    # Draining workers are left out: Kubernetes no longer counts a terminating pod, and counting its
    # tasks would ask for a replacement of the pod being scaled in.
    busy: Counter[str] = Counter()
    for worker in workers:
        if worker.status == WorkerStatus.ACTIVE and worker.tasks:
            names = sorted({str(gpu.get("name") or "unknown") for gpu in worker.hardware.get("gpus", [])})
            busy[",".join(names) or NO_GPU] += 1
    family = GaugeMetricFamily(
        BUSY_WORKERS,
        "Active workers holding at least one task, by the GPU model they carry ('none' without a GPU): the "
        "replicas an autoscaler must keep.",
        labels=list(SERIES[BUSY_WORKERS]),
    )
    for model, count in sorted(busy.items()):
        family.add_metric([model], count)
    return family


def _demand(demand: Demand) -> Iterator[Metric]:
    tasks = GaugeMetricFamily(
        PENDING_DEMAND_TASKS,
        "Tasks waiting for a worker (queued, or a retry waiting out its backoff), by the worker shape they need; "
        "gpu_type is 'any' for any model, 'none' without a GPU.",
        labels=list(SERIES[PENDING_DEMAND_TASKS]),
    )
    for shape, count in sorted(demand.tasks.items()):
        tasks.add_metric([shape.gpu_type, str(shape.gpu_count), shape.task_type, shape.topic], count)
    yield tasks
    gpus = GaugeMetricFamily(
        PENDING_DEMAND_GPUS,
        "GPUs the tasks waiting for a worker ask for, summed.",
        labels=list(SERIES[PENDING_DEMAND_GPUS]),
    )
    for (gpu_type, task_type, topic), count in sorted(demand.gpus().items()):
        gpus.add_metric([gpu_type, task_type, topic], count)
    yield gpus
    yield GaugeMetricFamily(
        PENDING_HELD,
        "Waiting tasks their owner's quota or exhausted budget holds: left out of the demand gauges, as a new "
        "worker would not start them.",
        value=float(demand.held),
    )
    yield GaugeMetricFamily(
        PENDING_DEMAND_TRUNCATED,
        f"1 when the demand gauges count only part of the waiting tasks (over {MAX_DEMAND_TASKS} waiting, "
        "or too many distinct shapes).",
        value=1.0 if demand.truncated else 0.0,
    )


def _wait_histogram(waits: list[float]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    for bound in WAIT_BUCKETS:
        buckets.append((_bound(bound), float(sum(1 for wait in waits if wait <= bound))))
    buckets.append(("+Inf", float(len(waits))))
    return HistogramMetricFamily(
        "mloc_task_wait_seconds",
        f"Submit-to-start time of the {WAIT_SAMPLE} most recently submitted tasks that started (a window, "
        "not a running total: compare quantiles across scrapes, not rates).",
        buckets=buckets,
        sum_value=sum(waits),
    )


def _bound(value: float) -> str:
    return str(float(value))


class AppMetrics:
    """One app's metric registry: the cluster collector and the request-latency histogram.

    Per app rather than prometheus_client's global registry, so several apps in one process
    (tests, embedded use) do not register the same names twice."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector())
        self.requests = Histogram(
            "mloc_http_request_duration_seconds",
            "Time from receiving an API request to sending its response headers, by route template.",
            labelnames=("method", "route", "status"),
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )


def app_metrics(app: Any) -> AppMetrics:
    """The app's metrics, created on first use (by the middleware or the first scrape)."""
    metrics: AppMetrics | None = getattr(app.state, "mloc_metrics", None)
    if metrics is None:
        metrics = AppMetrics()
        app.state.mloc_metrics = metrics
    return metrics


class RequestMetrics:
    """ASGI middleware that times each HTTP request into mloc_http_request_duration_seconds.

    The time is taken when the response headers go out, so a followed log stream counts its time to
    answer, not how long the client kept it open. Routes are labelled by template
    (/api/v1/tasks/{task_id}), never by raw path, so task ids do not blow up the label set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner = scope.get("app")
        if scope["type"] != "http" or owner is None:
            await self.app(scope, receive, send)
            return
        histogram = app_metrics(owner).requests
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            histogram.labels(scope.get("method", ""), template, str(status)).observe(time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            # Unhandled here means the server's error middleware answers 500. A cancelled request (the
            # client went away) is not counted: no answer was sent.
            observe(500)
            raise


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"application/openmetrics-text": {"schema": {"type": "string"}}}},
        503: {
            "description": "Reading the cluster's state from Redis took too long.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the cluster's state and the API's latency. Needs no token."""
    app: FastAPI = request.app
    orch: Orchestrator = app.state.orchestrator
    registry = app_metrics(app).registry
    try:
        snapshot = await asyncio.wait_for(read_snapshot(orch), SCRAPE_TIMEOUT_SEC)
    except TimeoutError:
        log.warning("/metrics: reading Redis took over %.0fs; answered 503", SCRAPE_TIMEOUT_SEC)
        return PlainTextResponse(
            f"# reading the cluster state from Redis took over {SCRAPE_TIMEOUT_SEC:.0f}s\n", status_code=503
        )
    # The text format Prometheus asks for in Accept (OpenMetrics or classic text), as prometheus_client's own
    # HTTP handler would answer.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    token = _current.set(snapshot)
    try:
        body = encode(registry)
    finally:
        _current.reset(token)
    return Response(body, headers={"Content-Type": content_type})
