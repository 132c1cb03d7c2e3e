"""The typed records and messages that cross between MLOC's processes, each with one encoder and one decoder.

- a task's hash: :class:`NewTask` (``to_hash``, what the orchestrator stores at submit) and
  :class:`TaskRecord` (``from_hash``, as the API shows it);
- a worker's hash: :class:`Registration` (``to_hash``, what the worker writes when it registers),
  :func:`heartbeat_fields` (what it refreshes) and :class:`WorkerView` (``from_hash``, the one reader,
  which :class:`WorkerRecord` shows through the API);
- the assignment on a worker's stream: :class:`Assignment` (``encode`` on the orchestrator,
  ``decode`` on the worker);
- an orchestrator's presence record: :class:`OrchestratorRecord` (``encode`` by the orchestrator it
  describes, ``decode`` by the other orchestrators and the workers; :mod:`mloc.orchestrators` holds
  what they do with it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, Field

from mloc.state import TaskState

# The user name of the admin (ORCHESTRATOR_TOKEN, or everyone while auth is off): the owner and
# ``submitted_by`` of the admin's tasks, whose model paths the worker does not restrict.
ADMIN = "admin"
# Task hash field: who submitted the task (ADMIN for the admin's token), read by the worker's model-path check.
SUBMITTED_BY = "submitted_by"


def _loads(raw: str | None, default: Any = None) -> Any:
    if not raw:
        return default
    try:
        # orjson parses a listing's many small documents a few times faster; json still reads what
        # orjson refuses (NaN a training metric may carry).
        return orjson.loads(raw)
    except ValueError:
        try:
            return json.loads(raw)
        except ValueError:
            return default


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _float(raw: str | None) -> float | None:
    return float(raw) if raw else None


def current_metrics(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A task's metrics as its runs left them, in order: a run that continued from a checkpoint
    trained again the steps its run before had logged past that checkpoint, so those entries of the
    earlier run are dropped (each entry names its ``run``; entries without one are of the first)."""
    first_step: dict[int, float] = {}
    for entry in entries:
        run, step = int(entry.get("run") or 1), entry.get("step")
        if isinstance(step, int | float):
            first_step[run] = min(first_step.get(run, step), step)
    kept = []
    for entry in entries:
        run, step = int(entry.get("run") or 1), entry.get("step")
        later = (first for other, first in first_step.items() if other > run)
        if isinstance(step, int | float) and any(first <= step for first in later):
            continue
        kept.append(entry)
    return kept


def runs_usage(before_raw: str | None, last_raw: str | None) -> dict[str, Any] | None:
    """A task's usage over its runs, from its hash fields: what its runs before a resume used
    (``usage_before``) and its last run's (``usage``), added figure by figure (each is a count or a time)."""
    before, last = _loads(before_raw), _loads(last_raw)
    if not isinstance(before, dict) or not before:
        return last if isinstance(last, dict) else None
    total = dict(before)
    for name, value in (last if isinstance(last, dict) else {}).items():
        earlier = total.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        total[name] = earlier + value if number and isinstance(earlier, int | float) else value
    return total


def _progress(raw: str | None, state: TaskState) -> dict[str, Any] | None:
    """The task's last progress report. An ended task's keeps its count but loses its ETA: that was a
    guess about a run that is over, and shown after a cancel or a failure it reads as time still to go."""
    progress = _loads(raw)
    if isinstance(progress, dict) and state.terminal:
        progress.pop("eta_sec", None)
    return progress


# ------------------------------------------------------------------------------------------- tasks
@dataclass
class NewTask:
    """A task as the orchestrator builds it at submit, not stored yet. :meth:`to_hash` is the hash
    :meth:`mloc.store.TaskStore.insert` writes; :meth:`TaskRecord.from_hash` reads it back."""

    task_id: str
    name: str
    owner: str
    task_type: str
    kind: str
    topic: str
    priority: int
    max_attempts: int
    created_at: float  # unix seconds
    document: dict[str, Any]  # the mloc/v1 document, wire form
    request: dict[str, Any]  # what it needs from a worker (``placement.Request.to_json()``)
    labels: dict[str, str] = field(default_factory=dict)
    submitted_by: str = ""
    # The retry policy, fixed at submit so every process that requeues the task applies the same one.
    retry_backoff_sec: float | None = None
    retry_backoff_max_sec: float | None = None
    # A shard of a replica group: its parent and its place in the group.
    parent_id: str | None = None
    replica: int | None = None
    # A replica group's parent: the number of shards and their ids (the parent is never placed itself).
    group_size: int | None = None
    children: list[str] = field(default_factory=list)
    # A chunked dataset task's parent: rows per chunk, and how many chunks may be unfinished at once.
    chunk_rows: int | None = None
    chunk_window: int | None = None
    # Tasks this one waits for (it is out of every queue until they succeed), and its pipeline.
    waiting_on: list[str] = field(default_factory=list)
    pipeline_id: str | None = None
    pending_reason: str = "waiting for the scheduler"
    pending_code: str = ""  # a quota or budget hold (PENDING_CODE), stored with the record
    unschedulable: bool = False
    # What admission estimated the task needs in memory (see mloc.orchestrator.admission), or why not.
    memory_estimate: dict[str, Any] | None = None
    # A place in the queues kept as given (a chunk keeps its parent's), where a new task's would be moved
    # on past the last one given (see :data:`mloc.lua.CREATE`).
    order_ms: int | None = None
    # When a chunk was cut (unix seconds): its created_at is its parent's, which keeps its place in the queue.
    cut_at: float | None = None

    @property
    def created_ms(self) -> int:
        """The order the task asks for in the queues: its kept place, else its submit time in ms, which the
        create script moves on past the last one given where it is not later."""
        return int(self.created_at * 1000) if self.order_ms is None else self.order_ms

    def to_hash(self) -> dict[str, str]:
        h = {
            "id": self.task_id,
            "name": self.name,
            "owner": self.owner,
            "task_type": self.task_type,
            "kind": self.kind,
            "topic": self.topic,
            "priority": str(self.priority),
            "state": TaskState.PENDING.value,
            "attempts": "0",
            "max_attempts": str(self.max_attempts),
            "created_at": repr(self.created_at),
            "created_ms": str(self.created_ms),
            "updated_at": repr(self.created_at),
            "spec": _dumps(self.document),
            "req": _dumps(self.request),
            "labels": _dumps(self.labels),
            "pending_reason": self.pending_reason,
        }
        # Optional fields are left out rather than stored empty: a record stays as small as it was.
        if self.submitted_by:
            h[SUBMITTED_BY] = self.submitted_by
        if self.retry_backoff_sec is not None:
            h["retry_backoff_sec"] = repr(float(self.retry_backoff_sec))
        if self.retry_backoff_max_sec is not None:
            h["retry_backoff_max_sec"] = repr(float(self.retry_backoff_max_sec))
        if self.parent_id is not None:
            h["parent_id"] = self.parent_id
        if self.replica is not None:
            h["replica"] = str(self.replica)
        if self.group_size is not None:
            h["group_size"] = str(self.group_size)
            h["children"] = _dumps(self.children)
        if self.cut_at is not None:
            h["cut_at"] = repr(self.cut_at)
        if self.chunk_rows is not None:
            h["chunk_rows"] = str(self.chunk_rows)
            h["chunk_window"] = str(self.chunk_window or 1)
        if self.waiting_on:
            h["waiting_on"] = _dumps(self.waiting_on)
        if self.pipeline_id is not None:
            h["pipeline_id"] = self.pipeline_id
        if self.unschedulable:
            h["unschedulable"] = "1"
        if self.pending_code:
            h[PENDING_CODE] = self.pending_code
        if self.memory_estimate is not None:
            h["memory_estimate"] = _dumps(self.memory_estimate)
        return h

    @property
    def queued(self) -> bool:
        """Whether it enters the pending queue when stored (a group's parent and a waiting task do not)."""
        return not self.group_size and not self.waiting_on


class TaskRecord(BaseModel):
    task_id: str
    name: str
    owner: str
    task_type: str
    kind: str
    state: TaskState
    topic: str
    priority: int = 0
    worker_id: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    # Times workers handed the task back after it started (lost, shut down, restarted): a budget of
    # its own (MLOC_MAX_REQUEUES), apart from the attempts its own failures spend.
    requeues: int = 0
    reason: str | None = None
    reason_code: str | None = None
    pending_reason: str | None = None
    # Set while its owner's quota or budget, not the fleet's room, holds it ("quota", "budget").
    pending_code: str | None = None
    unschedulable: bool = False
    cancel_requested: bool = False
    created_at: float
    # A chunk's: when it was cut (its created_at is its dataset task's).
    cut_at: float | None = None
    updated_at: float | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # A resumed dataset task's: the seconds it sat failed or cancelled before its resumes (not run time).
    stopped_sec: float | None = None
    # A resumed training task's: when its user resumed it (its queue time counts from there).
    resumed_at: float | None = None
    # When workers last handed it back to the queue (its queue time counts from there).
    requeued_at: float | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None  # over all its runs, for a resumed task
    result_summary: dict[str, Any] | None = None
    artifacts: dict[str, Any] = Field(default_factory=dict)
    parent_id: str | None = None
    replica: int | None = None
    children: list[str] = Field(default_factory=list)
    chunk_rows: int | None = None
    waiting_on: list[str] = Field(default_factory=list)
    pipeline_id: str | None = None
    # Admission's estimate of the memory it needs, and what its run measured (the worker's figures).
    memory_estimate: dict[str, Any] | None = None
    memory_peak_bytes: int | None = None
    memory_peak: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str], *, with_spec: bool = True) -> TaskRecord:
        state = TaskState(h["state"])
        return cls(
            task_id=h["id"],
            name=h.get("name", ""),
            owner=h.get("owner", ""),
            task_type=h.get("task_type", ""),
            kind=h.get("kind", ""),
            state=state,
            topic=h.get("topic", ""),
            priority=int(h.get("priority", "0")),
            worker_id=h.get("worker_id") or None,
            attempts=int(h.get("attempts", "0")),
            max_attempts=int(h.get("max_attempts", "1")),
            requeues=int(h.get("requeues", "0")),
            reason=h.get("reason") or None,
            reason_code=h.get("reason_code") or None,
            pending_reason=h.get("pending_reason") or None,
            pending_code=h.get(PENDING_CODE) or None,
            unschedulable=h.get("unschedulable") == "1",
            cancel_requested=h.get("cancel_requested") == "1",
            created_at=float(h.get("created_at", "0")),
            cut_at=_float(h.get("cut_at")),
            updated_at=_float(h.get("updated_at")),
            assigned_at=_float(h.get("assigned_at")),
            started_at=_float(h.get("started_at")),
            finished_at=_float(h.get("finished_at")),
            stopped_sec=_float(h.get("stopped_sec")),
            resumed_at=_float(h.get("resumed_at")),
            requeued_at=_float(h.get("requeued_at")),
            labels=_loads(h.get("labels"), {}),
            request=_loads(h.get("req"), {}),
            progress=_progress(h.get("progress"), state),
            usage=runs_usage(h.get("usage_before"), h.get("usage")),
            result_summary=_loads(h.get("result_summary")),
            artifacts=_loads(h.get("artifacts"), {}),
            parent_id=h.get("parent_id") or None,
            replica=int(h["replica"]) if h.get("replica") else None,
            children=_loads(h.get("children"), []),
            chunk_rows=int(h["chunk_rows"]) if h.get("chunk_rows") else None,
            waiting_on=_loads(h.get("waiting_on"), []),
            pipeline_id=h.get("pipeline_id") or None,
            memory_estimate=_loads(h.get("memory_estimate")),
            memory_peak_bytes=int(h["memory_peak_bytes"]) if h.get("memory_peak_bytes") else None,
            memory_peak=_loads(h.get("memory_peak")),
            spec=_loads(h.get("spec")) if with_spec else None,
        )


# ----------------------------------------------------------------------------------------- workers
class WorkerStatus(StrEnum):
    """A worker's ``status`` field. The transition and heartbeat scripts compare against these
    values: format them in (``WorkerStatus.ACTIVE.value``), never retype them."""

    ACTIVE = "active"  #: registered and heartbeating: new tasks may be placed on it
    DRAINING = "draining"  #: stopping: finishes what it runs, takes nothing new, still heartbeats
    RESTARTING = "restarting"  #: registering again, handing back what its earlier incarnation held
    OFFLINE = "offline"  #: stopped cleanly
    LOST = "lost"  #: its heartbeat expired; the orchestrator requeued its tasks
    #: never stored: the scheduler's view of an active worker whose heartbeat is older than the TTL
    #: but which the reaper has not marked lost yet
    UNRESPONSIVE = "unresponsive"
    #: never written: a status this version does not know (a newer MLOC's), or none at all
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> WorkerStatus:
        return cls.UNKNOWN


# Enum lookup by value is slow for a hot loop; this dict is not.
_STATUSES: dict[str, WorkerStatus] = {status.value: status for status in WorkerStatus}
# Statuses whose heartbeats count: a worker in any other status must register again.
HEARTBEATING = (WorkerStatus.ACTIVE, WorkerStatus.DRAINING)
# The worker hash fields that change between registrations (capacity, liveness, warm models), in the
# order the scheduler's snapshot reads them.
# The task hash's field holding a waiting task's wait code (mloc.orchestrator.placement.WaitCode);
# absent or "" while it waits for room.
PENDING_CODE = "pending_code"
# Set on a worker the admin cordoned (status draining while it runs on); a registration clears it.
CORDONED = "cordoned"
CHANGING_FIELDS = ("status", "last_heartbeat", "cpu_free", "mem_free", "slots_free", "warm_models", "held_models")
# Worker hash field: the facts of the models it holds (JSON: model key -> ModelFacts.to_wire()), read by
# admission one worker at a time, never by the scheduler's snapshot.
MODEL_FACTS = "model_facts"


@dataclass(frozen=True)
class Registration:
    """What a worker states when it (re)registers: :meth:`to_hash` is its hash, all capacity free."""

    worker_id: str
    hostname: str
    pid: int
    topics: list[str]
    tags: list[str]
    task_types: list[str]
    capabilities: dict[str, Any]
    hardware: dict[str, Any]
    cpu_milli: int
    memory_bytes: int
    slots: int
    version: str
    # The facts (config, sizes) of the models it holds, by model key: admission sizes tasks from them.
    model_facts: Mapping[str, Any] = field(default_factory=dict)
    # Its HEARTBEAT_INTERVAL_SEC: an orchestrator whose HEARTBEAT_TTL_SEC is not longer says so.
    heartbeat_interval_sec: float = 0.0
    # Its MLOC_ARTIFACT_STORE ("" for none): an orchestrator reading another store says so.
    artifact_store: str = ""

    def to_hash(self, now: float) -> dict[str, str]:
        return {
            "id": self.worker_id,
            "status": WorkerStatus.ACTIVE.value,
            "hostname": self.hostname,
            "pid": str(self.pid),
            "topics": _dumps(self.topics),
            "tags": _dumps(self.tags),
            "task_types": _dumps(self.task_types),
            "capabilities": _dumps(self.capabilities),
            "hardware": _dumps(self.hardware),
            "cpu_total": str(self.cpu_milli),
            "cpu_free": str(self.cpu_milli),
            "mem_total": str(self.memory_bytes),
            "mem_free": str(self.memory_bytes),
            "slots_total": str(self.slots),
            "slots_free": str(self.slots),
            "warm_models": "[]",
            "held_models": "[]",
            MODEL_FACTS: _dumps(dict(self.model_facts)),
            "registered_at": repr(now),
            "last_heartbeat": repr(now),
            "heartbeat_interval_sec": repr(float(self.heartbeat_interval_sec)),
            "version": self.version,
            "artifact_store": self.artifact_store,
        }


def heartbeat_fields(
    warm_models: Iterable[str], held_models: Iterable[str] = (), model_facts: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The worker hash fields a heartbeat refreshes besides ``last_heartbeat``: the models loaded in
    its executors, the hub ids and URLs whose files its disk holds (no download needed), and, when
    they changed, the facts of the models it holds."""
    fields = {"warm_models": _dumps(sorted(warm_models)), "held_models": _dumps(sorted(held_models))}
    if model_facts is not None:
        fields[MODEL_FACTS] = _dumps(dict(model_facts))
    return fields


@dataclass
class WorkerView:
    """A worker as its hash describes it: what it offers (fixed until it registers again) and what
    it has free now. The scheduler lowers the free figures as it places tasks within a pass."""

    worker_id: str
    status: WorkerStatus
    last_heartbeat: float
    topics: list[str]
    tags: set[str]
    task_types: set[str]
    capabilities: dict[str, Any]
    gpus: list[dict[str, Any]]  # index, name, memory_bytes
    cpu_total: int
    mem_total: int
    slots_total: int
    cpu_free: int
    mem_free: int
    slots_free: int
    free_gpus: set[int]
    warm_models: set[str] = field(default_factory=set)
    held_models: set[str] = field(default_factory=set)
    hostname: str = ""
    pid: int | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    registered_at: float | None = None
    version: str | None = None
    artifact_store: str | None = None  # None: registered by a version that did not say

    @classmethod
    def from_hash(cls, h: Mapping[str, str], free_gpus: Iterable[str | int] = ()) -> WorkerView:
        """The one reader of a worker's hash (``free_gpus``: the members of its free-GPU set)."""
        hardware = _loads(h.get("hardware"), {})
        view = cls(
            worker_id=h["id"],
            status=WorkerStatus.UNKNOWN,
            last_heartbeat=0.0,
            topics=_loads(h.get("topics"), []),
            tags=set(_loads(h.get("tags"), [])),
            task_types=set(_loads(h.get("task_types"), [])),
            capabilities=_loads(h.get("capabilities"), {}),
            gpus=hardware.get("gpus", []),
            cpu_total=int(h.get("cpu_total") or 0),
            mem_total=int(h.get("mem_total") or 0),
            slots_total=int(h.get("slots_total") or 0),
            cpu_free=0,
            mem_free=0,
            slots_free=0,
            free_gpus=set(),
            hostname=h.get("hostname", ""),
            pid=int(h["pid"]) if h.get("pid") else None,
            hardware=hardware,
            registered_at=_float(h.get("registered_at")),
            version=h.get("version"),
            artifact_store=h.get("artifact_store"),
        )
        view._read_changing([h.get(name) for name in CHANGING_FIELDS], free_gpus)
        return view

    def refreshed(self, changing: Sequence[str | None], free_gpus: Iterable[str | int]) -> WorkerView:
        """A copy with the fields that change between registrations read again: ``changing`` holds
        the values of :data:`CHANGING_FIELDS`, in that order. What the worker stated at registration
        is shared with this view, not copied: nothing changes it."""
        # A shallow copy without __init__: the scheduler makes one per worker per snapshot.
        view = object.__new__(WorkerView)
        view.__dict__.update(self.__dict__)
        view._read_changing(changing, free_gpus)
        return view

    def _read_changing(self, values: Sequence[str | None], free_gpus: Iterable[str | int]) -> None:
        status, last_heartbeat, cpu_free, mem_free, slots_free, warm, held = values
        self.status = _STATUSES.get(status or "", WorkerStatus.UNKNOWN)
        self.last_heartbeat = float(last_heartbeat or 0)
        self.cpu_free = int(cpu_free or 0)
        self.mem_free = int(mem_free or 0)
        self.slots_free = int(slots_free or 0)
        self.warm_models = set(_loads(warm, [])) if warm and warm != "[]" else set()
        self.held_models = set(_loads(held, [])) if held and held != "[]" else set()
        self.free_gpus = {int(g) for g in free_gpus}


class WorkerRecord(BaseModel):
    """A worker as the API shows it."""

    worker_id: str
    status: WorkerStatus
    hostname: str = ""
    pid: int | None = None
    topics: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    task_types: list[str] = Field(default_factory=list)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    capacity: dict[str, Any] = Field(default_factory=dict)
    free: dict[str, Any] = Field(default_factory=dict)
    warm_models: list[str] = Field(default_factory=list)
    held_models: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)
    registered_at: float | None = None
    last_heartbeat: float | None = None
    heartbeat_age_sec: float | None = None
    version: str | None = None
    cordoned: bool = False  # draining because the admin cordoned it, not because it is stopping
    artifact_store: str | None = Field(
        None, description="Where it publishes results (MLOC_ARTIFACT_STORE; empty: its RESULTS_DIR only)."
    )

    @classmethod
    def of(cls, view: WorkerView, *, now: float, tasks: Iterable[str], cordoned: bool = False) -> WorkerRecord:
        last = view.last_heartbeat or None
        return cls(
            worker_id=view.worker_id,
            status=view.status,
            hostname=view.hostname,
            pid=view.pid,
            topics=view.topics,
            tags=sorted(view.tags),
            task_types=sorted(view.task_types),
            capabilities=view.capabilities,
            hardware=view.hardware,
            capacity={
                "cpu_milli": view.cpu_total,
                "memory_bytes": view.mem_total,
                "gpus": len(view.gpus),
                "slots": view.slots_total,
            },
            free={
                "cpu_milli": view.cpu_free,
                "memory_bytes": view.mem_free,
                "gpus": sorted(view.free_gpus),
                "slots": view.slots_free,
            },
            warm_models=sorted(view.warm_models),
            held_models=sorted(view.held_models),
            tasks=sorted(tasks),
            registered_at=view.registered_at,
            last_heartbeat=last,
            heartbeat_age_sec=round(now - last, 3) if last else None,
            version=view.version,
            cordoned=cordoned and view.status == WorkerStatus.DRAINING,
            artifact_store=view.artifact_store,
        )


# ---------------------------------------------------------------------------------- orchestrators
@dataclass
class OrchestratorRecord:
    """What a running orchestrator says of itself in Redis (``keys.orchestrator``), renewed while it runs."""

    orchestrator_id: str
    host: str
    pid: int
    port: int
    started_at: float  # unix seconds
    version: str
    settings: dict[str, float]  # the fleet-wide settings it applies (mloc.orchestrators.FLEET_SETTINGS), by variable
    token: str  # mloc.orchestrators.token_digest of its ORCHESTRATOR_TOKEN
    refresh_sec: float  # how often it writes the record (0: not said)
    # When it last wrote the record, by its own clock: compared only with an earlier reading of the same
    # record, to learn whether its orchestrator still writes it.
    refreshed_at: float = 0.0

    def encode(self) -> str:
        return orjson.dumps(self).decode()

    @classmethod
    def decode(cls, raw: str) -> OrchestratorRecord | None:
        """The record, or None where it cannot be read (written by another version, or not MLOC's):
        its readers pass over it, as over an expired one."""
        try:
            data: dict[str, Any] = orjson.loads(raw)
            return cls(
                orchestrator_id=str(data["orchestrator_id"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                port=int(data["port"]),
                started_at=float(data["started_at"]),
                version=str(data.get("version", "")),
                settings={str(k): float(v) for k, v in dict(data["settings"]).items()},
                token=str(data.get("token", "")),
                refresh_sec=float(data.get("refresh_sec", 0.0)),
                refreshed_at=float(data.get("refreshed_at", 0.0)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def named(self) -> str:
        since = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"orchestrator {self.orchestrator_id} on {self.host} (pid {self.pid}, port {self.port}, started {since})"


# ------------------------------------------------------------------------------------- assignment
class AssignmentError(ValueError):
    """A stream entry that is not an assignment this worker can read."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """The message that puts a task on its worker's stream.

    The scheduler builds it and :meth:`encode` gives the entry's ``body``; the transition script that
    reserves the worker writes the entry as ``{task, body, attempt}``, adding the attempt the worker
    will run (only the script knows it); the worker reads the entry once with :meth:`decode`.
    """

    task_id: str
    owner: str
    gpus: tuple[int, ...]
    document: dict[str, Any]  # the task's mloc/v1 document, wire form
    attempt: int | None = None  # None from a script that did not announce it
    # The entry's body as sent: identical tasks share it, so a worker can key what it derives on it.
    body: str = field(default="", compare=False, repr=False)

    @property
    def task_type(self) -> str:
        return str(self.document["spec"]["taskType"])

    @property
    def labels(self) -> dict[str, str]:
        return (self.document.get("metadata") or {}).get("labels") or {}

    @property
    def timeout_sec(self) -> float | None:
        limit = self.document["spec"].get("timeout_sec")
        return float(limit) if limit else None

    def encode(self) -> str:
        return orjson.dumps({"spec": self.document, "owner": self.owner, "gpus": self.gpus}).decode()

    @classmethod
    def decode(cls, entry: Mapping[str, str]) -> Assignment:
        """The assignment in a stream entry's fields; :class:`AssignmentError` names what is wrong."""
        # The checks a well-formed entry passes, cheaply; :func:`_fault` says what is wrong with the rest.
        try:
            task_id, body = entry["task"], orjson.loads(entry["body"])
            document, owner, gpus = body["spec"], body["owner"], body["gpus"]
            spec, metadata, attempt = document["spec"], document.get("metadata") or {}, entry.get("attempt")
            timeout = spec.get("timeout_sec")
            readable = (
                bool(task_id)
                and type(owner) is str
                and type(gpus) is list
                and all(type(g) is int for g in gpus)
                and type(spec["taskType"]) is str
                and type(metadata) is dict
                and type(metadata.get("labels") or {}) is dict
                and (timeout is None or type(timeout) in (int, float))
                and (attempt is None or attempt.isdigit())
            )
        except (KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
            readable = False
        if not readable:
            task_id = entry.get("task") or ""
            of = f"of task {task_id}" if task_id else "without a task id"
            raise AssignmentError(
                f"assignment {of} is unreadable: {_fault(entry)}; the orchestrator that sent it may run another "
                "MLOC version than this worker: run the same version on both"
            )
        return cls(task_id, owner, tuple(gpus), document, None if attempt is None else int(attempt), entry["body"])


def _fault(entry: Mapping[str, str]) -> str:
    """What is wrong with an assignment entry that :meth:`Assignment.decode` refused."""
    if not entry.get("task"):
        return "the entry has no 'task' field"
    try:
        body = orjson.loads(entry.get("body") or "")
    except orjson.JSONDecodeError as exc:
        return f"its body is not JSON ({exc})"
    if not isinstance(body, dict):
        return "its body is not a JSON object"
    missing = [name for name in ("spec", "owner", "gpus") if name not in body]
    if missing:
        return f"its body lacks {', '.join(missing)}"
    document, gpus = body["spec"], body["gpus"]
    if not isinstance(body["owner"], str):
        return "its owner is not a string"
    if not isinstance(gpus, list) or not all(type(g) is int for g in gpus):
        return "its gpus are not a list of GPU indexes"
    spec = document.get("spec") if isinstance(document, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("taskType"), str):
        return "its document has no spec.taskType"
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, dict) or not isinstance(metadata.get("labels") or {}, dict):
        return "its document's metadata.labels is not a mapping"
    attempt = entry.get("attempt")
    if attempt is not None and not attempt.isdigit():
        return f"its attempt {attempt!r} is not a number"
    return "its document's spec.timeout_sec is not a number"
