"""The stored shapes of tasks and workers, as the API shows them."""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import BaseModel, Field

from mloc.state import TaskState


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


def _float(raw: str | None) -> float | None:
    return float(raw) if raw else None


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
    reason: str | None = None
    reason_code: str | None = None
    pending_reason: str | None = None
    unschedulable: bool = False
    cancel_requested: bool = False
    created_at: float
    updated_at: float | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    result_summary: dict[str, Any] | None = None
    artifacts: dict[str, Any] = Field(default_factory=dict)
    parent_id: str | None = None
    replica: int | None = None
    children: list[str] = Field(default_factory=list)
    spec: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str], *, with_spec: bool = True) -> TaskRecord:
        return cls(
            task_id=h["id"],
            name=h.get("name", ""),
            owner=h.get("owner", ""),
            task_type=h.get("task_type", ""),
            kind=h.get("kind", ""),
            state=TaskState(h["state"]),
            topic=h.get("topic", ""),
            priority=int(h.get("priority", "0")),
            worker_id=h.get("worker_id") or None,
            attempts=int(h.get("attempts", "0")),
            max_attempts=int(h.get("max_attempts", "1")),
            reason=h.get("reason") or None,
            reason_code=h.get("reason_code") or None,
            pending_reason=h.get("pending_reason") or None,
            unschedulable=h.get("unschedulable") == "1",
            cancel_requested=h.get("cancel_requested") == "1",
            created_at=float(h.get("created_at", "0")),
            updated_at=_float(h.get("updated_at")),
            assigned_at=_float(h.get("assigned_at")),
            started_at=_float(h.get("started_at")),
            finished_at=_float(h.get("finished_at")),
            labels=_loads(h.get("labels"), {}),
            request=_loads(h.get("req"), {}),
            progress=_loads(h.get("progress")),
            usage=_loads(h.get("usage")),
            result_summary=_loads(h.get("result_summary")),
            artifacts=_loads(h.get("artifacts"), {}),
            parent_id=h.get("parent_id") or None,
            replica=int(h["replica"]) if h.get("replica") else None,
            children=_loads(h.get("children"), []),
            spec=_loads(h.get("spec")) if with_spec else None,
        )


class WorkerRecord(BaseModel):
    worker_id: str
    status: str
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
    tasks: list[str] = Field(default_factory=list)
    registered_at: float | None = None
    last_heartbeat: float | None = None
    heartbeat_age_sec: float | None = None
    version: str | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str], *, now: float, tasks: list[str], free_gpus: list[int]) -> WorkerRecord:
        hardware = _loads(h.get("hardware"), {})
        last = _float(h.get("last_heartbeat"))
        return cls(
            worker_id=h["id"],
            status=h.get("status", "unknown"),
            hostname=h.get("hostname", ""),
            pid=int(h["pid"]) if h.get("pid") else None,
            topics=_loads(h.get("topics"), []),
            tags=_loads(h.get("tags"), []),
            task_types=_loads(h.get("task_types"), []),
            capabilities=_loads(h.get("capabilities"), {}),
            hardware=hardware,
            capacity={
                "cpu_milli": int(h.get("cpu_total", "0")),
                "memory_bytes": int(h.get("mem_total", "0")),
                "gpus": len(hardware.get("gpus", [])),
                "slots": int(h.get("slots_total", "0")),
            },
            free={
                "cpu_milli": int(h.get("cpu_free", "0")),
                "memory_bytes": int(h.get("mem_free", "0")),
                "gpus": sorted(free_gpus),
                "slots": int(h.get("slots_free", "0")),
            },
            warm_models=_loads(h.get("warm_models"), []),
            tasks=sorted(tasks),
            registered_at=_float(h.get("registered_at")),
            last_heartbeat=last,
            heartbeat_age_sec=round(now - last, 3) if last else None,
            version=h.get("version"),
        )
