"""The counters an ended task adds to its owner's usage day (``keys.usage_day``): the worker adds them
with a run's figures when it records the run's end (:mod:`mloc.worker.accounting`); the orchestrator
adds them alone for a task that ended without running (cancelled while queued, ended for its
dependencies), so usage statistics count every task once, when it ends."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.state import TaskState
from mloc.transition import COUNTED_END, utc_day

# The task hash fields :func:`taken_back` reads.
TAKEN_BACK_FIELDS = (COUNTED_END, "owner", "task_type")


def ended(task_type: str, state: TaskState) -> dict[str, float]:
    return {
        "tasks": 1.0,
        f"tasks.{task_type}": 1.0,
        f"tasks.{task_type}.{state}": 1.0,
        f"state.{state}": 1.0,
    }


async def taken_back(redis: aioredis.Redis, h: dict[str, str]) -> dict[str, Any]:
    """The parts of a move's change that take back the counters a task's earlier end added to its
    owner's usage day (usage counts a task once, when it ends for good; a resumed task, or a pipeline
    step waiting again, will end again): none when that end was not counted, or its day is no longer kept."""
    counted, _, state = (h.get(COUNTED_END) or "").partition(" ")
    owner = h.get("owner")
    if not counted or not owner or state not in TaskState.__members__.values():
        return {}
    at = float(counted)
    if not await redis.exists(keys.usage_day(owner, utc_day(at))):
        return {}
    counters = ended(h.get("task_type", ""), TaskState(state))
    return {"usage": {name: -value for name, value in counters.items()}, "usage_at": at, "owner": owner}
