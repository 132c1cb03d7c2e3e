"""The counters an ended task adds to its owner's usage day (``keys.usage_day``): the worker adds them
with a run's figures when it records the run's end (:mod:`mloc.worker.accounting`); the orchestrator
adds them alone for a task that ended without running (cancelled while queued, ended for its
dependencies), so usage statistics count every task once, when it ends."""

from __future__ import annotations

from mloc.state import TaskState


def ended(task_type: str, state: TaskState) -> dict[str, float]:
    return {
        "tasks": 1.0,
        f"tasks.{task_type}": 1.0,
        f"tasks.{task_type}.{state}": 1.0,
        f"state.{state}": 1.0,
    }
