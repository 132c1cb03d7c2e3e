"""Cancelling a task on a user's request, a hard budget's, or an owner's removal. Runs in the
orchestrator (the API's cancel route, :mod:`.overspend`, the admin's user removal)."""

from __future__ import annotations

import contextlib
import json
import time

from mloc import counters, keys, moves, tasklog
from mloc.errors import MlocError
from mloc.state import Reason, Refusal, TaskState
from mloc.store import TaskStore, Transition, require


def stopped_with(parent_id: str, *, dataset: bool, how: str) -> str:
    """The reason of a part (a dataset task's chunk, a replica group's replica) stopped because its
    whole ended: ``how`` is what became of the whole ("failed", "was cancelled by NAME")."""
    whole = "dataset task" if dataset else "replica group"
    return f"its {whole} {parent_id} {how}"


async def cancel(
    store: TaskStore,
    task_id: str,
    *,
    by: str,
    reason: str | None = None,
    reason_code: Reason = Reason.CANCELLED_BY_USER,
) -> Transition:
    """Cancel a task in any non-terminal state.

    A pending or assigned task is cancelled at once (its capacity is released and a worker that
    later reads its assignment skips it). A running task becomes ``cancelling``; its worker stops the
    executor and records the cancellation. A replica group's shards are cancelled, then its parent.
    ``reason`` replaces "cancelled by <by>" as the task's reason (the worker of a running task
    records it too, and so ``reason_code``: a script tells a budget's cancel from a user's by it).
    """
    record = await store.get(task_id, with_spec=False)
    if record.state.terminal:
        return require(Transition(False, error=Refusal.STATE, detail=record.state.value), task_id, TaskState.CANCELLED)
    now = time.time()
    ended = {
        "reason": reason or f"cancelled by {by}",
        "reason_code": reason_code.value,
        "finished_at": repr(now),
    }
    if record.children:
        # Its chunks wait with it for its dependencies: a resume would run them without what they wait for.
        waits = record.chunk_rows and await store.redis.hget(keys.task(record.children[0]), "waiting_on")
        if record.chunk_rows and not waits:
            resume = f"`mloc resume {task_id}` runs the chunks not finished and the rest of the data"
            ended["reason"] += f"; {resume}"
        # The parent first (it has no worker of its own): once it has ended, the shards' cancellations
        # cannot settle it as "a replica was cancelled" instead.
        outcome = require(
            await store.transition(task_id, moves.GROUP_CANCEL, fields=ended, now=now), task_id, TaskState.CANCELLED
        )
        await tasklog.append(store.redis, task_id, tasklog.ended(TaskState.CANCELLED, ended["reason"]))
        # A part's own reason names the task it was cancelled with (a worker would say "on request").
        why = reason or stopped_with(task_id, dataset=bool(record.chunk_rows), how=f"was cancelled by {by}")
        for child in record.children:
            with contextlib.suppress(MlocError):
                await cancel(store, child, by=by, reason=why, reason_code=reason_code)
        return outcome
    if record.state in (TaskState.RUNNING, TaskState.CANCELLING):
        return await _stop_running(
            store,
            task_id,
            record.state,
            record.worker_id or "",
            record.attempts,
            by=by,
            reason=reason,
            reason_code=reason_code,
        )
    outcome = await store.transition(
        task_id,
        moves.CANCEL,
        release=True,
        fields={**ended, "pending_reason": ""},
        # It ends without a run to record it: counted here, once, as its worker would have; but not a
        # chunk cut past its data's end, which the user never asked for.
        usage=None if reason_code == Reason.PAST_THE_DATA else counters.ended(record.task_type, TaskState.CANCELLED),
        owner=record.owner,
        now=now,
    )
    if not outcome.ok and outcome.error == Refusal.STATE and outcome.detail == TaskState.RUNNING:
        return await cancel(store, task_id, by=by, reason=reason, reason_code=reason_code)  # it started meanwhile
    if outcome.ok:
        await tasklog.append(store.redis, task_id, tasklog.ended(TaskState.CANCELLED, ended["reason"]))
    return require(outcome, task_id, TaskState.CANCELLED)


async def _stop_running(
    store: TaskStore,
    task_id: str,
    state: TaskState,
    worker_id: str,
    attempt: int,
    *,
    by: str,
    reason: str | None,
    reason_code: Reason,
) -> Transition:
    """Mark a running task ``cancelling`` and tell its worker to stop it. Asking again re-sends the
    request (the first one may have reached a worker that was restarting)."""
    if state == TaskState.RUNNING:
        fields = {"cancel_requested": "1", "cancel_requested_by": by}
        if reason:
            fields["cancel_reason"] = reason
        if reason_code != Reason.CANCELLED_BY_USER:
            # The worker records the end, and the requeue of a lost worker's task: both read it here.
            fields["cancel_reason_code"] = reason_code.value
        outcome = await store.transition(task_id, moves.REQUEST_CANCEL, fields=fields)
        if not outcome.ok:
            if outcome.error == Refusal.STATE and outcome.detail not in (TaskState.RUNNING, TaskState.CANCELLING):
                # It ended, or was handed back, meanwhile.
                return await cancel(store, task_id, by=by, reason=reason, reason_code=reason_code)
            return require(outcome, task_id, TaskState.CANCELLING)
        # Written before the worker hears of it, so it comes before the worker's "cancelled" line.
        await tasklog.append(store.redis, task_id, tasklog.cancel_requested(by))
    await store.redis.publish(keys.worker_control(worker_id), json.dumps({"cancel": task_id}))
    return Transition(True, previous=state.value, attempt=attempt, state=TaskState.CANCELLING)


async def cancel_unstarted(store: TaskStore, owner: str, *, by: str, reason: str, reason_code: Reason) -> list[str]:
    """Cancel every task of ``owner`` that has not started (pending, waiting for its dependencies or
    a retry, or assigned); returns their ids. A replica group's parent goes first, taking its shards."""
    redis = store.redis
    pipe = redis.pipeline(transaction=False)
    for state in (TaskState.PENDING, TaskState.ASSIGNED):
        pipe.zinter([keys.tasks_in_state(state), keys.tasks_of_owner(owner)])
    ids = [task_id for found in await pipe.execute() for task_id in found]
    pipe = redis.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(keys.task(task_id), "children")
    parents = {task_id for task_id, children in zip(ids, await pipe.execute(), strict=True) if children}
    cancelled: list[str] = []
    for task_id in sorted(ids, key=lambda task_id: task_id not in parents):
        try:
            await cancel(store, task_id, by=by, reason=reason, reason_code=reason_code)
        except MlocError:
            continue  # ended meanwhile, or cancelled with its parent
        cancelled.append(task_id)
    return cancelled


async def running_of(store: TaskStore, owner: str) -> list[str]:
    """The ids of ``owner``'s tasks that are running or being cancelled."""
    pipe = store.redis.pipeline(transaction=False)
    for state in (TaskState.RUNNING, TaskState.CANCELLING):
        pipe.zinter([keys.tasks_in_state(state), keys.tasks_of_owner(owner)])
    return [task_id for found in await pipe.execute() for task_id in found]
