"""Task states, the transitions allowed between them, and the reasons a task ends or waits."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "pending"  # accepted, waiting for a worker that fits (pending_reason says why)
    ASSIGNED = "assigned"  # placed: capacity reserved and the task is on its worker's stream
    RUNNING = "running"  # the worker started the executor
    SUCCEEDED = "succeeded"  # the executor returned a result
    FAILED = "failed"  # the executor raised, or retries ran out; reason says why
    CANCELLED = "cancelled"  # a user cancelled it

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

# States in which the task holds capacity on a worker; leaving them releases it.
HOLDS_CAPACITY = frozenset({TaskState.ASSIGNED, TaskState.RUNNING})

ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    # PENDING -> RUNNING: only a replica group's parent, when its first shard starts
    TaskState.PENDING: frozenset({TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}),
    # back to PENDING: worker lost, worker shut down before starting it, or placement handed back
    TaskState.ASSIGNED: frozenset({TaskState.RUNNING, TaskState.PENDING, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.RUNNING: frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.PENDING}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


def sources_of(target: TaskState) -> frozenset[TaskState]:
    """States from which ``target`` may be entered."""
    return frozenset(src for src, targets in ALLOWED.items() if target in targets)


class Reason(StrEnum):
    """Machine-readable cause codes; the record's ``reason`` text says it for a person."""

    WORKER_LOST = "worker_lost"
    WORKER_SHUTDOWN = "worker_shutdown"
    WORKER_RESTARTED = "worker_restarted"
    EXECUTOR_ERROR = "executor_error"
    EXECUTOR_CRASHED = "executor_crashed"
    NO_EXECUTOR = "no_executor"
    RETRIES_EXHAUSTED = "retries_exhausted"
    CANCELLED_BY_USER = "cancelled_by_user"
    TIMEOUT = "timeout"
