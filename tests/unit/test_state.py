"""mloc.state: the table of allowed moves and the codes that say why."""

from __future__ import annotations

from mloc import moves
from mloc.state import ALLOWED, INFRASTRUCTURE, TERMINAL, Reason, TaskState, sources_of


def test_the_table_names_every_state_and_only_states() -> None:
    assert set(ALLOWED) == set(TaskState)
    assert all(targets <= set(TaskState) for targets in ALLOWED.values())


def test_a_terminal_state_is_left_only_by_a_resume_and_every_other_has_a_way_out() -> None:
    for state in TaskState:
        assert state.terminal == (state in TERMINAL)
        if state.terminal:
            # A failed or cancelled task is resumed: a chunked dataset task's parent runs again at once
            # (moves.GROUP_RESUME), a training task waits to be placed (moves.RESUME); a success is final.
            assert ALLOWED[state] <= {TaskState.RUNNING, TaskState.PENDING}, state
        else:
            assert ALLOWED[state], state
    assert ALLOWED[TaskState.SUCCEEDED] == frozenset()
    assert moves.GROUP_RESUME.sources == moves.RESUME.sources == {TaskState.FAILED, TaskState.CANCELLED}


def test_no_state_moves_to_itself() -> None:
    assert all(state not in ALLOWED[state] for state in TaskState)


def test_sources_of_reads_the_table_backwards() -> None:
    assert sources_of(TaskState.SUCCEEDED) == {TaskState.RUNNING, TaskState.CANCELLING}
    assert sources_of(TaskState.CANCELLING) == {TaskState.RUNNING}
    assert sources_of(TaskState.ASSIGNED) == {TaskState.PENDING}
    assert sources_of(TaskState.PENDING) == {
        TaskState.ASSIGNED,
        TaskState.RUNNING,
        TaskState.FAILED,
        TaskState.CANCELLED,
    }
    for target in TaskState:
        assert all(target in ALLOWED[source] for source in sources_of(target))


def test_a_replica_parent_takes_its_code_from_the_shard_that_ended_it() -> None:
    assert Reason.of_replica(TaskState.FAILED) == Reason.REPLICA_FAILED == "replica_failed"
    assert Reason.of_replica(TaskState.CANCELLED) == Reason.REPLICA_CANCELLED == "replica_cancelled"


def test_only_a_workers_loss_shutdown_restart_or_lost_track_spends_the_requeue_budget() -> None:
    assert {Reason.WORKER_LOST, Reason.WORKER_SHUTDOWN, Reason.WORKER_RESTARTED, Reason.ORPHANED} == INFRASTRUCTURE
    assert Reason.EXECUTOR_CRASHED not in INFRASTRUCTURE


def test_a_cancelling_task_ends_and_is_never_placed_again() -> None:
    # Lost with its worker, it is cancelled; finishing first, it keeps what it made.
    assert ALLOWED[TaskState.CANCELLING] == {TaskState.CANCELLED, TaskState.SUCCEEDED, TaskState.FAILED}
    assert TaskState.PENDING not in ALLOWED[TaskState.CANCELLING]
    assert not TaskState.CANCELLING.terminal
