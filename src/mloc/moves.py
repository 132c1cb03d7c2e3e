"""Every move MLOC makes with a task's state, by name, and what a requested change carries.

A :class:`Move` is data: a name, the state it enters and the states it may leave. The code never
asks for a state by itself; it asks for one of the moves below (``store.transition(id, moves.START,
...)``), so this list is the whole of what can happen to a task. :meth:`Move.check` holds each move
against :data:`mloc.state.ALLOWED` before Redis is touched, and the transition script checks the
same table again (it is generated into the script), so neither side can take a move the table
forbids. tests/unit/test_moves.py walks every move here against the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mloc.errors import InvalidTransition
from mloc.state import ALLOWED, TaskState


@dataclass(frozen=True)
class Move:
    """A named change of a task's state: the state it enters and the states it may leave."""

    name: str
    target: TaskState
    sources: frozenset[TaskState]
    # Whether the table allows the move, worked out once: it is checked on every change a process asks for.
    allowed: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", bool(self.sources) and not self.forbidden())

    def forbidden(self) -> list[TaskState]:
        """The sources from which :data:`~mloc.state.ALLOWED` does not let a task enter the target."""
        return sorted(source for source in self.sources if self.target not in ALLOWED[source])

    def check(self) -> None:
        """Raise :class:`InvalidTransition` unless every source may enter the target."""
        if self.allowed:
            return
        wrong = self.forbidden()
        edges = ", ".join(f"{source} -> {self.target}" for source in wrong) or f"no source for {self.target}"
        raise InvalidTransition(
            f"move {self.name!r} asks for {edges}, which mloc.state.ALLOWED does not allow; "
            "change the move's sources or the table"
        )


def _move(name: str, target: TaskState, *sources: TaskState) -> Move:
    return Move(name, target, frozenset(sources))


P, A, R, C = TaskState.PENDING, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING

# The scheduler placed the task: capacity reserved, assignment on the worker's stream.
PLACE = _move("place", A, P)
# The worker took the assignment and starts the executor (a new attempt).
START = _move("start", R, A)
# The worker cannot read the assignment (see mloc.records.Assignment): the task fails unstarted.
REFUSE = _move("refuse", TaskState.FAILED, A)
# A user cancels a running task: the orchestrator marks it and tells its worker, which stops it.
REQUEST_CANCEL = _move("request_cancel", C, R)
# The worker records how the attempt ended (a cancelled one may have finished before it heard).
SUCCEED = _move("succeed", TaskState.SUCCEEDED, R, C)
FAIL = _move("fail", TaskState.FAILED, R, C)
# The user's cancel, carried out by the worker; or by the reaper, when a cancelling task's worker is lost.
CANCEL_RUNNING = _move("cancel_running", TaskState.CANCELLED, R, C)
# Handed back (worker lost, shut down or restarted, or its executor crashed): placed again later.
REQUEUE = _move("requeue", P, A, R)
# Handed back once too often: the requeue budget or the task's attempts are used up.
GIVE_UP = _move("give_up", TaskState.FAILED, R)
# A user cancels a task that has not started; a running one is cancelled by its worker.
CANCEL = _move("cancel", TaskState.CANCELLED, P, A)
# A replica group's parent has no worker: the orchestrator moves it as its shards move.
GROUP_START = _move("group_start", R, P)
GROUP_SUCCEED = _move("group_succeed", TaskState.SUCCEEDED, R)
GROUP_FAIL = _move("group_fail", TaskState.FAILED, P, R)
GROUP_CANCEL = _move("group_cancel", TaskState.CANCELLED, P, R)
# A task waiting for others, ended because one of them failed or was cancelled (onDependencyFailure:
# fail; "skip" cancels it with CANCEL).
DEPENDENCY_FAIL = _move("dependency_fail", TaskState.FAILED, P)
# A chunked dataset task that failed or was cancelled, resumed: the chunks not finished run again.
GROUP_RESUME = _move("group_resume", R, TaskState.FAILED, TaskState.CANCELLED)
# A training task that failed or was cancelled, resumed: placed again, it continues from its last checkpoint.
RESUME = _move("resume", P, TaskState.FAILED, TaskState.CANCELLED)
# A task ended because a task it waits for failed, waiting again once that task was resumed.
REWAIT = _move("rewait", P, TaskState.FAILED, TaskState.CANCELLED)

ALL: tuple[Move, ...] = (
    PLACE,
    START,
    REFUSE,
    REQUEST_CANCEL,
    SUCCEED,
    FAIL,
    CANCEL_RUNNING,
    REQUEUE,
    GIVE_UP,
    CANCEL,
    GROUP_START,
    GROUP_SUCCEED,
    GROUP_FAIL,
    GROUP_CANCEL,
    GROUP_RESUME,
    RESUME,
    REWAIT,
    DEPENDENCY_FAIL,
)

_ENDINGS = {TaskState.SUCCEEDED: SUCCEED, TaskState.FAILED: FAIL, TaskState.CANCELLED: CANCEL_RUNNING}


def finish(state: TaskState) -> Move:
    """The move with which a worker records an attempt that ended in ``state``."""
    try:
        return _ENDINGS[state]
    except KeyError:
        raise InvalidTransition(f"an attempt ends succeeded, failed or cancelled, not {state}") from None


@dataclass(frozen=True)
class Reservation:
    """Capacity a placement takes on a worker, and the assignment message it writes to its stream."""

    worker_id: str
    cpu: int
    mem: int
    gpus: list[int]
    message: str
    user: str = ""  # the task's owner: the reservation counts against their quota
    max_tasks: int = 0  # limits for a user without their own quota (0 = unlimited)
    max_gpus: int = 0


@dataclass(frozen=True)
class Change:
    """One requested change of a task: a named move and everything written in the same atomic step
    (see :meth:`mloc.store.TaskStore.transition` for what each part does)."""

    move: Move
    expect_worker: str | None = None
    expect_attempt: int | None = None
    fields: Mapping[str, str] | None = None
    release: bool = False
    reserve: Reservation | None = None
    new_attempt: bool = False
    result: Mapping[str, Any] | None = None
    usage: Mapping[str, float] | None = None
    owner: str | None = None
    ack: str | None = None
    priority: int = 0
    created_ms: int = 0
    now: float | None = None
    retry_at: float | None = None
    # When ``usage`` counts (its day), if not now: a resume takes back the counters of an earlier end.
    usage_at: float | None = None
    waits: bool = False  # entering pending out of the queues: it waits for other tasks (mloc.orchestrator.pipelines)
    # Lines for the task's log that report this move (mloc.tasklog.stored of each), written only if it is made.
    log: tuple[Mapping[str, str], ...] = ()
    log_retention_sec: float | None = None  # the log's expiry, as mloc.tasklog.add sets it
