"""Worker registrations for tests that drive the scheduler and store without worker processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mloc.records import NewTask, Registration
from mloc.store import TaskStore


def registration(
    worker_id: str,
    *,
    slots: int = 4,
    gpus: int = 0,
    cpu: int = 4000,
    memory: int = 1 << 30,
    gpu_memory: int = 1,
    gpu_name: str = "NVIDIA L4",
    task_types: Sequence[str] = ("echo",),
    capabilities: dict[str, Any] | None = None,
    model_facts: dict[str, Any] | None = None,
) -> Registration:
    """A worker that takes every topic and (by default) echo tasks, with ``gpus`` GPUs (NVIDIA L4s)."""
    return Registration(
        worker_id=worker_id,
        hostname="h",
        pid=1,
        topics=["tasks.*"],
        tags=[],
        task_types=list(task_types),
        capabilities=capabilities or {},
        hardware={"gpus": [{"index": i, "name": gpu_name, "memory_bytes": gpu_memory} for i in range(gpus)]},
        cpu_milli=cpu,
        memory_bytes=memory,
        slots=slots,
        version="t",
        model_facts=model_facts or {},
    )


def echo_record(store: TaskStore, owner: str = "alice", *, max_attempts: int = 1, priority: int = 0) -> NewTask:
    """A new echo task's record, as the orchestrator builds one, not yet stored."""
    return store.new_record(
        document={"spec": {}},
        name="t",
        owner=owner,
        task_type="echo",
        kind="EchoTask",
        topic="tasks.echo",
        priority=priority,
        max_attempts=max_attempts,
        request={},
        labels={},
    )
