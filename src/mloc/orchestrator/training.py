"""A failed or cancelled training task resumed by its user: placed again, it continues from the last
checkpoint it saved.

A training task saves checkpoints as it runs (``hyperparameters.save_steps``, and one more when it is
cancelled), and every run after its first starts from the newest one it finds
(:mod:`mloc.checkpoints`): that is how a requeue after a worker's loss loses little. A resume makes
the same second run on purpose, after the task has ended: the task goes back to pending
(``moves.RESUME``) under its own id, so its checkpoints, metrics, log and place in the pipeline stay
where they were, and a worker takes it as it would take any waiting task. Dataset tasks resume their
own way (:func:`mloc.orchestrator.chunks.resume`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from mloc import checkpoints, counters, moves, tasklog
from mloc.errors import Conflict
from mloc.records import runs_usage
from mloc.state import Reason, TaskState
from mloc.store import TaskStore, task_not_found
from mloc.transition import COUNTED_END

# Ended for a reason a resume cannot undo: the owner is gone.
_FINAL = frozenset({Reason.USER_REMOVED.value})


async def resume(store: TaskStore, task_id: str, *, by: str, results_dir: Path) -> dict[str, Any]:
    """Put a failed or cancelled training task back in the queue, to continue from its last checkpoint.

    Its attempts (``spec.retries``, spent when its executor process dies) are granted afresh for the
    new run: what the earlier runs spent stays counted, so ``attempts`` reads like the rest of its
    history."""
    h = await store.get_hash(task_id)
    if not h:
        raise task_not_found(task_id)
    state = TaskState(h["state"])
    if state not in (TaskState.FAILED, TaskState.CANCELLED):
        raise Conflict(f"task {task_id} is {state}; only a failed or cancelled task is resumed")
    if h.get("group_size") or h.get("parent_id"):
        raise Conflict(f"task {task_id} is part of a group that runs as one; resume the group's parent task")
    if h.get("reason_code") in _FINAL:
        raise Conflict(f"task {task_id} cannot be resumed: {h.get('reason') or h['reason_code']}")
    found = await asyncio.to_thread(checkpoints.newest, results_dir / task_id / checkpoints.CHECKPOINTS_DIR)
    attempts, requeues = int(h.get("attempts") or 0), int(h.get("requeues") or 0)
    # The allowance per run is what the task was submitted with, kept apart once max_attempts grows.
    allowance = int(h.get("attempt_allowance") or h.get("max_attempts") or 1)
    start = f"continues from {found[1].name} (step {found[0]})" if found else "saved no checkpoint, so it starts over"
    said = tasklog.Line("resumed", f"resumed by {by}: it {start} once a worker takes it")
    fields = {
        "reason": "",
        "reason_code": "",
        "finished_at": "",
        "progress": "",
        "worker_id": "",  # its last run's, until a worker takes it again
        "cancel_requested": "",
        "cancel_reason": "",
        "cancel_reason_code": "",
        "pending_reason": f"resumed by {by}: waiting for the scheduler",
        "attempt_allowance": str(allowance),
        "max_attempts": str(attempts - requeues + allowance),
        "resumed_by": by,
        # The task's usage is over all its runs: what the runs so far used is kept apart from the next one's.
        "usage": "",
        "usage_before": json.dumps(runs_usage(h.get("usage_before"), h.get("usage")) or {}),
        "resumed_at": repr(time.time()),
    }
    fields[COUNTED_END] = ""
    moved = await store.apply(
        task_id,
        moves.Change(
            moves.RESUME,
            fields=fields,
            priority=int(h.get("priority") or 0),
            created_ms=int(h.get("created_ms") or 0),
            log=(tasklog.stored(said),),
            **await counters.taken_back(store.redis, h),
        ),
    )
    if not moved.ok:
        raise Conflict(f"task {task_id} could not be resumed: {moved.error} {moved.detail}")
    return {
        "ok": True,
        "task_id": task_id,
        "state": TaskState.PENDING.value,
        "checkpoint": found[1].name if found else None,
        "from_step": found[0] if found else None,
    }
