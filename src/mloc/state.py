"""Task states, the moves allowed between them, and the codes that say why a task ends, waits or
a move is refused."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "pending"  # accepted, waiting for a worker that fits (pending_reason says why)
    ASSIGNED = "assigned"  # placed: capacity reserved and the task is on its worker's stream
    RUNNING = "running"  # the worker started the executor
    CANCELLING = "cancelling"  # a user cancelled it while it ran; its worker is stopping it
    SUCCEEDED = "succeeded"  # the executor returned a result
    FAILED = "failed"  # the executor raised, or retries ran out; reason says why
    CANCELLED = "cancelled"  # a user cancelled it

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

# Every move a task may make, and nothing else: checked in Python before Redis is touched and again
# inside the transition script (which gets this table generated into it). mloc.moves names the moves.
ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    # PENDING -> RUNNING: only a replica group's parent, when its first shard starts
    TaskState.PENDING: frozenset({TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}),
    # back to PENDING: worker lost, worker shut down or restarted before starting it
    TaskState.ASSIGNED: frozenset({TaskState.RUNNING, TaskState.PENDING, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.RUNNING: frozenset(
        {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.PENDING, TaskState.CANCELLING}
    ),
    # It may still end otherwise: it finished, or failed, before the executor heard of the cancel.
    # Never back to PENDING: a cancelling task whose worker is lost is cancelled, not requeued.
    TaskState.CANCELLING: frozenset({TaskState.CANCELLED, TaskState.SUCCEEDED, TaskState.FAILED}),
    TaskState.SUCCEEDED: frozenset(),
    # Resumed by its user: a chunked dataset task's parent runs again at once (its finished chunks
    # stand, the rest run again); a training task waits to be placed, to continue from its checkpoint.
    TaskState.FAILED: frozenset({TaskState.RUNNING, TaskState.PENDING}),
    TaskState.CANCELLED: frozenset({TaskState.RUNNING, TaskState.PENDING}),
}


def sources_of(target: TaskState) -> frozenset[TaskState]:
    """States from which ``target`` may be entered."""
    return frozenset(src for src, targets in ALLOWED.items() if target in targets)


class Reason(StrEnum):
    """Machine-readable cause codes (a task's ``reason_code``); the record's ``reason`` text says it
    for a person."""

    WORKER_LOST = "worker_lost"  # no heartbeat: the reaper handed its tasks back
    WORKER_SHUTDOWN = "worker_shutdown"  # stopped (SIGTERM) with the task assigned or still running
    WORKER_RESTARTED = "worker_restarted"  # came back under the same id; what it held went back
    ORPHANED = "orphaned"  # its live worker was not running it (a Redis outage lost an answer to the worker)
    REQUEUES_EXHAUSTED = "requeues_exhausted"  # handed back by workers more than MLOC_MAX_REQUEUES times
    EXECUTOR_ERROR = "executor_error"  # the executor raised
    EXECUTOR_CRASHED = "executor_crashed"  # the executor process died (most often out of memory)
    NO_EXECUTOR = "no_executor"  # the worker has no executor for the task type
    ASSIGNMENT_UNREADABLE = "assignment_unreadable"  # the worker could not read the assignment message
    CANCELLED_BY_USER = "cancelled_by_user"
    BUDGET_EXHAUSTED = "budget_exhausted"  # cancelled by its owner's hard budget, pending or running
    USER_REMOVED = "user_removed"  # cancelled before it started: the admin removed its owner
    TIMEOUT = "timeout"  # ran past spec.timeout_sec and was stopped
    REPLICA_FAILED = "replica_failed"  # a replica group's parent: one of its shards failed
    REPLICA_CANCELLED = "replica_cancelled"  # a replica group's parent: one of its shards was cancelled
    DEPENDENCY_FAILED = "dependency_failed"  # a task it depends on failed or was cancelled
    CONDITION_NOT_MET = "condition_not_met"  # skipped: the eval score its spec.when reads did not pass
    PAST_THE_DATA = "past_the_data"  # a dataset task's chunk cut before the data's end was known, past it

    @classmethod
    def of_replica(cls, state: TaskState) -> Reason:
        """The parent's code when a shard ended in ``state`` (failed or cancelled)."""
        return cls.REPLICA_CANCELLED if state == TaskState.CANCELLED else cls.REPLICA_FAILED


# Handed back for reasons outside the task: these spend the task's requeue budget
# (MLOC_MAX_REQUEUES), never its own attempts (spec.retries).
INFRASTRUCTURE = frozenset({Reason.WORKER_LOST, Reason.WORKER_SHUTDOWN, Reason.WORKER_RESTARTED, Reason.ORPHANED})


class Refusal(StrEnum):
    """Why the transition script refused a move (``Transition.error``)."""

    MISSING = "missing"  # no such task
    STATE = "state"  # the task is not in one of the move's source states (detail: its state)
    FORBIDDEN = "forbidden"  # the move is not in ALLOWED (detail: "from -> to")
    FENCED = "fenced"  # another worker or attempt holds the task now (detail: the holder)
    CAPACITY = "capacity"  # the worker has no room, or is not active (detail: what is short)
    QUOTA = "quota"  # the owner is at a limit (detail: "tasks|gpus <in use> <limit>")
    BACKOFF = "backoff"  # a retry placed before its backoff ended (detail: when it ends)


class StopReason(StrEnum):
    """Why a worker stops a task it is running."""

    CANCELLED = "cancelled"  # a user asked
    SHUTDOWN = "shutdown"  # the worker is stopping and the grace period ran out: handed back
    TIMEOUT = "timeout"  # past spec.timeout_sec: fails
    LOST = "lost"  # the orchestrator declared this worker lost and already handed the task back
