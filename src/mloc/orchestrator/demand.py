"""Pending demand by worker shape: what the tasks waiting for a worker ask for, for autoscalers.

Counted over the placeable queue (PENDING) and the retries waiting out their backoff (RETRY_WAIT),
which are both work a new worker could take. Tasks waiting for their dependencies sit in neither and
are left out: a worker started for them would idle. So are tasks their owner's quota or exhausted
budget holds (the :class:`.placement.WaitCode` the scheduler writes with their reason): they start
when one of the owner's tasks ends, the budget resets or the admin raises a limit, never because a
worker joined, so a node started for them would idle too (``Demand.held`` counts them).

The read is bounded (``limit`` records, a batch per script call), so a deep queue cannot make a
scrape slow; a capped read says so. 50,000 waiting tasks take about 0.5 s to count (1 s when every
request differs), against 2.5 s with pipelined HMGETs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mloc import keys, lua
from mloc.orchestrator.placement import WaitCode
from mloc.records import PENDING_CODE
from mloc.state import TaskState

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

BATCH = 500  # task records per script call: each call holds Redis for a few milliseconds at most
# Distinct shapes kept per call: the GPU type is free text, and each shape becomes a Prometheus series.
MAX_SHAPES = 1000
ANY_GPU = "any"
NO_GPU = "none"


@dataclass(frozen=True, order=True)
class Shape:
    """The kind of worker a waiting task needs."""

    gpu_type: str  # lower-cased as the task asks ("a100", "h100-80gb"), "any", or "none" without a GPU
    gpu_count: int
    task_type: str
    topic: str


@dataclass
class Demand:
    """Waiting tasks counted by shape."""

    tasks: Counter[Shape] = field(default_factory=Counter)
    truncated: bool = False  # some waiting tasks were not read (over ``limit``) or not kept (over MAX_SHAPES)
    held: int = 0  # waiting tasks left out: their owner's quota or budget holds them, not the fleet's room

    def gpus(self) -> Counter[tuple[str, str, str]]:
        """GPUs asked for, by (gpu_type, task_type, topic); shapes without a GPU are left out."""
        total: Counter[tuple[str, str, str]] = Counter()
        for shape, count in self.tasks.items():
            if shape.gpu_count:
                total[(shape.gpu_type, shape.task_type, shape.topic)] += shape.gpu_count * count
        return total


def gpu_label(gpu_type: str, gpu_count: int) -> str:
    """The GPU type a shape shows: case and spacing folded so "A100" and "a100" are one series."""
    if gpu_count <= 0:
        return NO_GPU
    text = " ".join(gpu_type.lower().split())
    return ANY_GPU if text in ("", ANY_GPU, "*") else text


def shape_of(req_json: str) -> Shape | None:
    """The shape of a stored request (a task record's ``req`` field), or None if it is unreadable."""
    try:
        req = json.loads(req_json)
        count = int(req.get("gpu_count") or 0)
        return Shape(gpu_label(str(req.get("gpu_type") or ""), count), count, str(req["task_type"]), str(req["topic"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


async def read_demand(redis: aioredis.Redis, *, limit: int, batch: int = BATCH) -> Demand:
    """Count the waiting tasks by shape, reading at most ``limit`` task records (queue order first)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(keys.PENDING)
    pipe.zcard(keys.RETRY_WAIT)
    queued, retrying = (int(n) for n in await pipe.execute())
    # The queue in placement order first, so a capped read counts the tasks that would run first.
    take_queued = min(queued, limit)
    take_retrying = min(retrying, limit - take_queued)
    # Both ranges in one MULTI, so a retry promoted meanwhile is read once, not twice or not at all.
    pipe = redis.pipeline(transaction=True)
    # ZRANGE 0 -1 would read a whole set: a range is asked only when something is taken from it.
    for key, take in ((keys.PENDING, take_queued), (keys.RETRY_WAIT, take_retrying)):
        if take:
            pipe.zrange(key, 0, take - 1)
    ranges = await pipe.execute() if take_queued or take_retrying else []
    ids = [task_id for found in ranges for task_id in found]
    demand = Demand(truncated=queued + retrying > take_queued + take_retrying)
    count_placeable = redis.register_script(lua.COUNT_PLACEABLE)
    holding = " " + " ".join(code.value for code in WaitCode) + " "
    shapes: dict[str, Shape | None] = {}
    unreadable = 0
    for start in range(0, len(ids), batch):
        reply = await count_placeable(
            args=[keys.task("{id}"), TaskState.PENDING.value, PENDING_CODE, holding, *ids[start : start + batch]]
        )
        demand.held += int(reply[0])
        for req_json, count in zip(reply[1::2], reply[2::2], strict=True):
            if req_json not in shapes:
                shapes[req_json] = shape_of(req_json)
            shape = shapes[req_json]
            if shape is None:
                unreadable += int(count)
            elif shape in demand.tasks or len(demand.tasks) < MAX_SHAPES:
                demand.tasks[shape] += int(count)
            else:
                demand.truncated = True
    if unreadable:
        log.warning("pending demand: %d waiting task(s) have an unreadable request and are not counted", unreadable)
    return demand
