"""Placement: which worker runs a task, with capacity reserved atomically, or why it must wait.

The orchestrator chooses from a snapshot of the registry; the reservation itself is checked again
inside Redis (see :meth:`TaskStore.transition`), so a stale snapshot or a second orchestrator can
never oversubscribe a worker: the reservation fails and the task is tried elsewhere.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mloc import keys
from mloc.registry import WorkerRegistry, WorkerView
from mloc.spec.base import Document, ModelSpec
from mloc.spec.quantity import format_cpu, format_memory
from mloc.state import TaskState
from mloc.store import Reservation, TaskStore

log = logging.getLogger(__name__)
SNAPSHOT_MAX_AGE_SEC = 0.25
# Agent tools a worker must switch on (MLOC_ALLOW_PYTHON_TOOL, MLOC_WEB_SEARCH_PROVIDER).
GATED_TOOLS = ("python_repl", "web_search")
CAPABILITY_WORDS = {"engines": "engine", "agent_tools": "agent tool"}


@dataclass(frozen=True)
class Request:
    """What a task needs from a worker."""

    task_type: str
    topic: str
    cpu: int = 0  # millicores
    mem: int = 0  # bytes
    gpu_count: int = 0
    gpu_type: str = "any"
    gpu_mem: int = 0
    tags: tuple[str, ...] = ()
    model: str | None = None
    # (capability, value) pairs the worker's executor must advertise, e.g. ("engines", "vllm").
    needs: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data["needs"] = [list(pair) for pair in self.needs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        return cls(
            **{
                **data,
                "tags": tuple(data.get("tags", ())),
                "needs": tuple((str(k), str(v)) for k, v in data.get("needs", ())),
            }
        )


def request_of(document: Document) -> Request:
    spec = document.spec
    hw = spec.resources.hardware
    model = getattr(spec, "model", None)
    needs: list[tuple[str, str]] = []
    if isinstance(model, ModelSpec) and model.engine.value != "auto":
        needs.append(("engines", model.engine.value))
    options = getattr(spec, "hyperparameters", None)
    for tool in getattr(options, "tools", None) or ():
        if tool in GATED_TOOLS:
            needs.append(("agent_tools", tool))
    return Request(
        task_type=spec.task_type,
        topic=spec.effective_topic,
        cpu=hw.cpu,
        mem=hw.memory,
        gpu_count=hw.gpu.count,
        gpu_type=hw.gpu.type,
        gpu_mem=hw.gpu.memory or 0,
        tags=tuple(spec.resources.tags),
        model=spec.model_identifier(),
        needs=tuple(needs),
    )


_NOISE = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def _gpu_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _NOISE]


def gpu_matches(requested: str, name: str) -> bool:
    """'any' matches every GPU; otherwise each token of the request must appear in the GPU's name,
    so 'a100' and 'A100-80GB' both match 'NVIDIA A100-SXM4-80GB'."""
    if requested.strip().lower() in ("", "any", "*"):
        return True
    wanted = _gpu_tokens(requested)
    have = set(_gpu_tokens(name))
    return bool(wanted) and all(token in have for token in wanted)


def topic_matches(topic: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(topic, pattern) for pattern in patterns)


def _gpus_for(req: Request, view: WorkerView, pool: set[int]) -> list[int] | None:
    usable = [
        g["index"]
        for g in view.gpus
        if g["index"] in pool
        and gpu_matches(req.gpu_type, g.get("name", ""))
        and g.get("memory_bytes", 0) >= req.gpu_mem
    ]
    return sorted(usable)[: req.gpu_count] if len(usable) >= req.gpu_count else None


def misfit(req: Request, view: WorkerView, *, when_idle: bool = False) -> str | None:
    """Why ``view`` cannot take ``req`` now (or, with ``when_idle``, ever); None if it can."""
    if view.status != "active":
        return f"is {view.status}"
    if not topic_matches(req.topic, view.topics):
        return f"does not take topic {req.topic!r} (takes {', '.join(view.topics)})"
    if req.task_type not in view.task_types:
        return f"has no executor for {req.task_type!r}"
    offered = view.capabilities.get(req.task_type, {})
    for capability, value in req.needs:
        have = offered.get(capability, [])
        if value not in have:
            what = CAPABILITY_WORDS.get(capability, capability)
            return f"has no {value} {what} (has {', '.join(have) or 'none'})"
    missing = [t for t in req.tags if t not in view.tags]
    if missing:
        return f"lacks tag(s) {', '.join(missing)}"
    cpu = view.cpu_total if when_idle else view.cpu_free
    mem = view.mem_total if when_idle else view.mem_free
    scope = "in all" if when_idle else "free"
    if req.cpu > cpu:
        return f"has {format_cpu(max(cpu, 0))} CPU {scope}, needs {format_cpu(req.cpu)}"
    if req.mem > mem:
        return f"has {format_memory(max(mem, 0))} memory {scope}, needs {format_memory(req.mem)}"
    if req.gpu_count:
        pool = {g["index"] for g in view.gpus} if when_idle else view.free_gpus
        if _gpus_for(req, view, pool) is None:
            kinds = ", ".join(sorted({g.get("name", "?") for g in view.gpus})) or "no GPU"
            which = f"{req.gpu_type} " if req.gpu_type.lower() != "any" else ""
            return (
                f"has {len(pool)} {'GPU(s) in all' if when_idle else 'free GPU(s)'} ({kinds}), "
                f"needs {req.gpu_count} {which}GPU(s)"
            )
    if not when_idle and view.slots_free < 1:
        return f"is running its maximum of {view.slots_total} task(s)"
    return None


def _score(req: Request, view: WorkerView) -> tuple[int, int, int, int]:
    warm = 0
    if req.model:
        warm = int(any(key.split(":", 1)[-1] == req.model for key in view.warm_models))
    # Keep GPU machines for GPU work, pack GPU tasks tightly, otherwise spread by free slots.
    wasted_gpus = len(view.free_gpus) - req.gpu_count
    gpu_worker_for_cpu_task = int(req.gpu_count == 0 and bool(view.gpus))
    return (-warm, gpu_worker_for_cpu_task, wasted_gpus if req.gpu_count else 0, -view.slots_free)


@dataclass
class Placement:
    worker_id: str | None
    pending_reason: str | None = None
    unschedulable: bool = False
    tried: list[str] = field(default_factory=list)


def explain(req: Request, views: list[WorkerView]) -> tuple[str, bool]:
    """A person-readable reason the task waits, and whether no registered worker could ever run it."""
    live = [v for v in views if v.status == "active"]
    if not live:
        return "no worker is registered; start one with `mloc start --node-type worker`", True
    never = [(v.worker_id, misfit(req, v, when_idle=True)) for v in live]
    if all(reason for _, reason in never):
        detail = "; ".join(f"{w} {r}" for w, r in never[:5])
        more = f" (and {len(never) - 5} more)" if len(never) > 5 else ""
        return f"no registered worker can run this task: {detail}{more}", True
    now = [(v.worker_id, misfit(req, v)) for v in live if misfit(req, v, when_idle=True) is None]
    detail = "; ".join(f"{w} {r}" for w, r in now[:5] if r)
    return f"waiting for capacity: {detail}", False


class Scheduler:
    def __init__(self, store: TaskStore, registry: WorkerRegistry, *, heartbeat_ttl_sec: float) -> None:
        self.store = store
        self.registry = registry
        self.heartbeat_ttl_sec = heartbeat_ttl_sec
        self._views: list[WorkerView] = []
        self._views_at = 0.0
        self._lock = asyncio.Lock()

    async def views(self, *, fresh: bool = False) -> list[WorkerView]:
        now = time.monotonic()
        if fresh or now - self._views_at > SNAPSHOT_MAX_AGE_SEC:
            views = await self.registry.snapshot()
            cutoff = time.time() - self.heartbeat_ttl_sec
            for view in views:
                if view.status == "active" and view.last_heartbeat < cutoff:
                    view.status = "unresponsive"
            self._views, self._views_at = views, now
        return self._views

    def invalidate(self) -> None:
        self._views_at = 0.0

    async def place(
        self,
        task_id: str,
        req: Request,
        *,
        owner: str,
        document: str,
        priority: int,
        created_ms: int,
        avoid: frozenset[str] = frozenset(),
        current_reason: str | None = None,
    ) -> Placement:
        """Try to place one pending task now; on failure record why it waits."""
        placement = Placement(worker_id=None)
        for attempt in range(3):
            views = await self.views(fresh=attempt > 0)
            candidates = [v for v in views if misfit(req, v) is None]
            # Replicas of one task go to different workers where they can.
            candidates.sort(key=lambda v: (v.worker_id in avoid, _score(req, v)))
            for view in candidates:
                gpus = _gpus_for(req, view, view.free_gpus) if req.gpu_count else []
                assert gpus is not None
                message = json.dumps(
                    {"spec": json.loads(document), "owner": owner, "gpus": gpus}, separators=(",", ":")
                )
                outcome = await self.store.transition(
                    task_id,
                    TaskState.ASSIGNED,
                    sources=[TaskState.PENDING],
                    reserve=Reservation(view.worker_id, req.cpu, req.mem, gpus, message),
                    fields={
                        "assigned_at": repr(time.time()),
                        "pending_reason": "",
                        "unschedulable": "",
                        "gpus": json.dumps(gpus),
                    },
                )
                placement.tried.append(view.worker_id)
                if outcome.ok:
                    view.cpu_free -= req.cpu
                    view.mem_free -= req.mem
                    view.slots_free -= 1
                    view.free_gpus -= set(gpus)
                    placement.worker_id = view.worker_id
                    return placement
                if outcome.error != "capacity":
                    # Cancelled or placed by another orchestrator meanwhile: nothing to do.
                    placement.pending_reason = f"not pending any more ({outcome.error} {outcome.detail})"
                    return placement
            if not candidates:
                break
        views = await self.views()
        reason, never = explain(req, views)
        placement.pending_reason, placement.unschedulable = reason, never
        if reason != current_reason:
            await self.store.set_fields(task_id, {"pending_reason": reason, "unschedulable": "1" if never else "0"})
        return placement

    async def schedule_pending(self, limit: int = 1000) -> int:
        """One pass over waiting tasks, highest priority and oldest first; returns how many were placed."""
        async with self._lock:
            ids = await self.store.pending_ids(limit)
            if not ids:
                return 0
            pipe = self.store.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(
                    keys.task(task_id), "req", "owner", "spec", "priority", "created_ms", "state", "pending_reason"
                )
            rows = await pipe.execute()
            placed = 0
            self.invalidate()
            # A request that found no worker in this pass will not find one for an identical request
            # either (capacity only shrinks within a pass), so those are skipped, keeping a pass cheap
            # when many tasks wait.
            no_room: set[str] = set()
            for task_id, row in zip(ids, rows, strict=True):
                req_json, owner, spec, priority, created_ms, state, reason = row
                if state != TaskState.PENDING or not req_json:
                    await self.store.redis.zrem(keys.PENDING, task_id)  # stale index entry
                    continue
                if req_json in no_room:
                    continue
                outcome = await self.place(
                    task_id,
                    Request.from_json(json.loads(req_json)),
                    owner=owner,
                    document=spec,
                    priority=int(priority),
                    created_ms=int(created_ms),
                    current_reason=reason,
                )
                if outcome.worker_id is None:
                    no_room.add(req_json)
                placed += outcome.worker_id is not None
            return placed
