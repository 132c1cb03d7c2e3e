"""Handing a task back to the scheduler when its worker can no longer run it, and the two budgets that
decide when a task has been handed back often enough.

Both processes do this: the orchestrator's reaper for workers that went silent, and a worker for its
own tasks when it shuts down, restarts under the same id, or its executor process dies.

A task's own failures (its executor crashed) spend its attempts (``max_attempts``, from
``spec.retries``). Losing its worker is not the task's failure: requeues after a worker was lost,
shut down or restarted spend a separate, larger budget (``MLOC_MAX_REQUEUES``), counted in the task's
``requeues`` field, so a task on a flaky fleet is not failed for faults it did not cause, while a task
that brings down every worker it lands on still ends. ``attempts`` keeps counting every start.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mloc import keys, moves, tasklog
from mloc.records import runs_usage
from mloc.state import INFRASTRUCTURE, Reason, Refusal, TaskState
from mloc.store import TaskStore, Transition

log = logging.getLogger(__name__)
# A retry waits up to this fraction longer than its backoff, so tasks that failed together do not
# all come back in the same instant.
BACKOFF_JITTER = 0.1
# Requeues after worker loss a task may take when the caller names no budget (the settings' default).
DEFAULT_MAX_REQUEUES = 20
# A hand-back that lost a race with the task's own start (same worker, new attempt) reads it again.
_RACE_TRIES = 3


@dataclass(frozen=True)
class Backoff:
    """How long retry ``n`` waits before it may be placed: ``base_sec * 2**(n-1)``, at most
    ``max_sec``, plus up to 10% jitter. A base of 0 retries at once."""

    base_sec: float = 5.0
    max_sec: float = 300.0

    def delay(self, retry: int) -> float:
        if self.base_sec <= 0 or self.max_sec <= 0 or retry < 1:
            return 0.0
        wait = min(self.max_sec, self.base_sec * 2.0 ** min(retry - 1, 64))
        return wait * (1.0 + random.uniform(0.0, BACKOFF_JITTER))


def seconds(raw: str | None) -> float | None:
    """A stored time or duration, or None when it is absent or unreadable."""
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _consumed(usage: Mapping[str, float] | None) -> dict[str, float] | None:
    """Usage counters without the task counts: a retried attempt used resources but ended no task."""
    if not usage:
        return None
    return {name: value for name, value in usage.items() if not name.startswith(("tasks", "state."))} or None


def _ended_as(usage: Mapping[str, float] | None, state: TaskState) -> dict[str, float] | None:
    """A whole run's counters, naming the state the task ends in: only the verdict knows it (a task
    being cancelled ends cancelled, whatever its worker called the run)."""
    if not usage:
        return None
    ended: dict[str, float] = {}
    for name, value in usage.items():
        head, _, last = name.rpartition(".")
        if name.startswith(("tasks.", "state.")) and last in _STATES:
            name = f"{head}.{state}"
        ended[name] = ended.get(name, 0.0) + value
    return ended


_STATES = frozenset(TaskState)


@dataclass(frozen=True)
class Verdict:
    """What a hand-back does with a task, decided from its record: the move, the retry that counts
    (0 for a task that never started), whether a budget is used up, and the reason text."""

    move: moves.Move
    retry: int
    exhausted: bool
    reason_code: Reason
    reason: str
    pending_reason: str
    requeues: int | None = None  # the new ``requeues`` count, when this hand-back spends one


def verdict(
    *,
    started: bool,
    reason_code: Reason,
    reason: str,
    attempts: int,
    max_attempts: int,
    requeues: int,
    max_requeues: int,
    cancelling: bool = False,
    cancel_code: Reason = Reason.CANCELLED_BY_USER,
) -> Verdict:
    """The decision of :func:`requeue`, apart from Redis so it can be read (and tested) on its own."""
    if cancelling:
        # Its owner asked for it to stop: it ends here rather than run again on another worker.
        text = f"{reason}; it was being cancelled, so it is cancelled"
        return Verdict(moves.CANCEL_RUNNING, 0, True, cancel_code, text, "")
    if not started:
        # Never tried: nothing is spent and the task is placeable at once.
        return Verdict(
            moves.REQUEUE, 0, False, reason_code, f"{reason}; requeued", "requeued: waiting for the scheduler"
        )
    if reason_code in INFRASTRUCTURE:
        count = requeues + 1
        if count > max_requeues:
            text = (
                f"{reason}; requeued {requeues} times after worker loss, the most MLOC_MAX_REQUEUES "
                f"({max_requeues}) allows; not requeued again"
            )
            return Verdict(moves.GIVE_UP, count, True, Reason.REQUEUES_EXHAUSTED, text, "")
        text = f"{reason}; requeued (requeue {count} of {max_requeues} after worker loss; its attempts are not used)"
        waiting = f"requeue {count} of {max_requeues} after {reason}"
        return Verdict(moves.REQUEUE, count, False, reason_code, text, waiting, requeues=count)
    # The task's own failure: every start that did not end in a worker's loss counts.
    failures = attempts - requeues
    if failures >= max_attempts:
        text = f"{reason}; no retries left ({failures} of {max_attempts} attempts used)"
        return Verdict(moves.GIVE_UP, failures, True, reason_code, text, "")
    text = f"{reason}; requeued ({failures} of {max_attempts} attempts used)"
    waiting = f"retry {failures} of {max_attempts - 1} after {reason}"
    return Verdict(moves.REQUEUE, failures, False, reason_code, text, waiting)


async def requeue(
    store: TaskStore,
    task_id: str,
    *,
    worker_id: str,
    reason_code: Reason,
    reason: str,
    attempt: int | None = None,
    backoff: Backoff | None = None,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    final_usage: Mapping[str, float] | None = None,
    owner: str | None = None,
    run_usage: Mapping[str, Any] | None = None,
) -> Transition:
    """Hand a task its worker can no longer run back to the scheduler, or fail it when the budget
    its ``reason_code`` spends is used up (see the module's docstring). Fenced on the worker and the
    attempt (``attempt``, else the one read here), so a task already moved elsewhere is left alone.

    A task that had started is a retry: it waits out its backoff (the task's own policy stored at
    submit, else ``backoff``) in the retry index before the scheduler may place it again. A task
    handed back before it started was never tried, so it is placeable at once. ``final_usage`` (the
    attempt's daily usage counters) is recorded for ``owner``: whole when this ends the task, only
    what the attempt consumed (time, GPU-seconds, tokens) when the task is tried again. ``run_usage`` (the
    attempt's usage as the task's record shows it, when its worker knows it) is kept apart from the next
    run's, so the record's usage is over all its runs."""
    for _ in range(_RACE_TRIES):
        outcome = await _requeue_once(
            store,
            task_id,
            worker_id=worker_id,
            reason_code=reason_code,
            reason=reason,
            attempt=attempt,
            backoff=backoff or Backoff(),
            max_requeues=max_requeues,
            final_usage=final_usage,
            owner=owner,
            run_usage=run_usage,
        )
        # Refused because the worker started the task between the read and the move: read it again.
        if outcome.ok or attempt is not None or outcome.error not in (Refusal.FENCED, Refusal.STATE):
            return outcome
        holder, state = await store.redis.hmget(keys.task(task_id), "worker_id", "state")
        if holder != worker_id or state not in (TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING):
            return outcome
    return outcome


async def _requeue_once(
    store: TaskStore,
    task_id: str,
    *,
    worker_id: str,
    reason_code: Reason,
    reason: str,
    attempt: int | None,
    backoff: Backoff,
    max_requeues: int,
    final_usage: Mapping[str, float] | None,
    owner: str | None,
    run_usage: Mapping[str, Any] | None = None,
) -> Transition:
    h = await store.redis.hmget(
        keys.task(task_id),
        "priority",
        "created_ms",
        "attempts",
        "max_attempts",
        "state",
        "requeues",
        "retry_backoff_sec",
        "retry_backoff_max_sec",
        "cancel_reason_code",
        "usage_before",
    )
    priority, created_ms, attempts, max_attempts, state, requeues, base_sec, max_sec, cancel_code, before = h
    if state is None:
        return Transition(False, error=Refusal.MISSING)
    decided = verdict(
        started=state in (TaskState.RUNNING, TaskState.CANCELLING),
        reason_code=reason_code,
        reason=reason,
        attempts=int(attempts or 0),
        max_attempts=int(max_attempts or 1),
        requeues=int(requeues or 0),
        max_requeues=max_requeues,
        cancelling=state == TaskState.CANCELLING,
        # Who asked for the cancel (a hard budget, say) still shows when the worker is gone.
        cancel_code=Reason(cancel_code) if cancel_code in Reason.__members__.values() else Reason.CANCELLED_BY_USER,
    )
    now = time.time()
    retry_at = None
    if decided.retry and not decided.exhausted:
        base, most = seconds(base_sec), seconds(max_sec)
        policy = Backoff(backoff.base_sec if base is None else base, backoff.max_sec if most is None else most)
        wait = policy.delay(decided.retry)
        retry_at = now + wait if wait > 0 else None
    fields = {
        "reason": decided.reason,
        "reason_code": decided.reason_code.value,
        "pending_reason": decided.pending_reason,
        "worker_id": "",
        "cancel_requested": "",
    }
    if not decided.exhausted:
        fields["progress"] = ""  # the next attempt starts from nothing; a stale "2/20, ETA 36 s" would mislead
        fields["requeued_at"] = repr(now)  # its next wait counts from here, not from its creation
    if decided.requeues is not None:
        fields["requeues"] = str(decided.requeues)
    if decided.exhausted:
        fields["finished_at"] = repr(now)
    if run_usage:
        fields["usage_before"] = json.dumps(runs_usage(before, json.dumps(run_usage)))
    outcome = await store.transition(
        task_id,
        decided.move,
        expect_worker=worker_id,
        expect_attempt=int(attempts or 0) if attempt is None else attempt,
        release=True,
        priority=int(priority or 0),
        created_ms=int(created_ms or 0),
        retry_at=retry_at,
        usage=_ended_as(final_usage, decided.move.target) if decided.exhausted else _consumed(final_usage),
        owner=owner,
        fields=fields,
        now=now,
    )
    if outcome.ok:
        line = _log_line(decided, reason, int(max_attempts or 1), max_requeues, retry_at and retry_at - now)
        await tasklog.append(store.redis, task_id, line)
    return outcome


def _log_line(decided: Verdict, reason: str, max_attempts: int, max_requeues: int, wait: float | None) -> tasklog.Line:
    """What the task's log says of a hand-back: requeued after what, what it spent, when it may run."""
    if decided.exhausted:
        return tasklog.ended(decided.move.target, decided.reason)
    if not decided.retry:
        detail = "it had not started"
    elif decided.requeues is not None:
        detail = f"requeue {decided.requeues} of {max_requeues} after worker loss; its attempts are not used"
    else:
        detail = f"{decided.retry} of {max_attempts} attempts used"
    return tasklog.requeued(reason, detail, wait)


@dataclass
class HandBack:
    """What :func:`hand_back` did with a worker's tasks."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # a budget was used up
    cancelled: list[str] = field(default_factory=list)  # it was being cancelled
    dropped: list[str] = field(default_factory=list)  # finished or moved meanwhile: no longer held


async def hand_back(
    store: TaskStore,
    worker_id: str,
    *,
    reason_code: Reason,
    reason: str,
    keep: Collection[str] = (),
    backoff: Backoff | None = None,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
) -> HandBack:
    """Requeue every task ``worker_id`` holds, except those in ``keep`` (a live worker's running
    tasks, which it ends itself), and drop the worker's stream of assignments: what it had not read
    is handed back with the rest. Used by the reaper (worker lost), a worker that shuts down and a
    worker that registers again under the same id."""
    done = HandBack()
    for task_id in sorted(await store.redis.smembers(keys.worker_tasks(worker_id))):
        if task_id in keep:
            continue
        outcome = await requeue(
            store,
            task_id,
            worker_id=worker_id,
            reason_code=reason_code,
            reason=reason,
            backoff=backoff,
            max_requeues=max_requeues,
        )
        if outcome.ok:
            ended = {TaskState.FAILED: done.failed, TaskState.CANCELLED: done.cancelled}
            ended.get(outcome.state or TaskState.PENDING, done.requeued).append(task_id)
        else:
            await store.redis.srem(keys.worker_tasks(worker_id), task_id)
            done.dropped.append(task_id)
    await store.redis.delete(keys.worker_stream(worker_id))
    # The operator's record of an incident: each task's own log has its line too.
    if done.requeued:
        log.info("worker %s: %d task(s) requeued (%s): %s", worker_id, len(done.requeued), reason, _ids(done.requeued))
    if done.cancelled:
        stopped = len(done.cancelled)
        log.info("worker %s: %d task(s) being cancelled ended cancelled: %s", worker_id, stopped, _ids(done.cancelled))
    if done.failed:
        log.warning("worker %s: %d task(s) failed, out of requeues: %s", worker_id, len(done.failed), done.failed)
    return done


def _ids(task_ids: list[str], shown: int = 5) -> str:
    """The first few ids of a list for a log line, and how many more."""
    more = f" and {len(task_ids) - shown} more" if len(task_ids) > shown else ""
    return ", ".join(task_ids[:shown]) + more
