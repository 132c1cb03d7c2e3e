"""The queue replayed on the workers' resources: when, and where, a waiting task starts.

Pure computation over figures read elsewhere (:mod:`.eta` reads them). Each worker is a *lane*: what it
has free now, and the tasks it holds, each giving back its GPUs, CPU, memory and slot at its expected
end (:func:`.shadow.expected_end`). At now and at each later moment something is given back, the
waiting tasks take, in queue order, whatever fits them, as a scheduling pass does: a task that does
not fit yet does not stop a later one that does, and of the workers that fit it, it takes the one a
pass would (:func:`.placement.packing`). A task started in the replay holds its share for
its usual run. The tasks behind the one asked about count too: while it does not fit, a smaller
one behind it that does takes what frees first (so a big task in a stream of small ones waits long,
as it does for real until a backfill hold covers it). The replay stops when the task starts.

Waiting tasks of one request are one *kind* here: if the first of them does not fit at a moment, none
does, so a moment costs a look per kind, not per task, and a long queue of a few kinds replays fast.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mloc.orchestrator.placement import packing
from mloc.orchestrator.shadow import Capacity, Holding, Need


@dataclass(frozen=True)
class Lane:
    """A worker in the replay: nothing starts on it before ``opens_at`` (a backfill hold keeping the
    task off it); each of ``holdings`` gives back what it holds at its ``ends_at``, which is set;
    ``gpu_worker``: it has GPUs (a pass keeps those workers for GPU tasks)."""

    worker_id: str
    free: Capacity
    holdings: tuple[Holding, ...]
    opens_at: float = 0.0
    gpu_worker: bool = False


@dataclass(frozen=True)
class Waiter:
    """A waiting task: what it needs on each lane it can run on (by worker id), for how long, and
    its kind (waiters of one kind have the same needs and run)."""

    kind: str
    needs: Mapping[str, Need]
    run_sec: float


@dataclass(frozen=True)
class Start:
    """Where and when the task starts, and what it lacked there at the outset (missing GPUs, slots,
    CPU, memory, as :meth:`Capacity.missing` counts them)."""

    at: float
    worker_id: str
    lacked: tuple[int, int, int, int]


def replay(
    lanes: Sequence[Lane], ahead: Sequence[Waiter], task: Waiter, now: float, behind: Sequence[Waiter] = ()
) -> Start | None:
    """When ``task`` starts behind ``ahead`` and before ``behind`` (both in queue order) on ``lanes``;
    None if it never does (no lane it can use ever frees enough, or a hold keeps it off the only one
    for good). A task behind that fits while ``task`` does not takes what it fits first, as in a pass."""
    free = {lane.worker_id: lane.free for lane in lanes}
    opens = {lane.worker_id: lane.opens_at for lane in lanes}
    order = [lane.worker_id for lane in lanes]
    gpu_workers = {lane.worker_id for lane in lanes if lane.gpu_worker}
    outset = dict(free)
    # (moment, tie-break, worker, what comes back); a lane opening later gives back nothing.
    events: list[tuple[float, int, str, Holding | None]] = []
    tie = itertools.count()
    for lane in lanes:
        for held in lane.holdings:
            if held.ends_at is None:
                raise ValueError(f"holding {held.task_id} on {lane.worker_id} has no end to replay")
            events.append((max(now, held.ends_at), next(tie), lane.worker_id, held))
        if lane.opens_at > now:
            events.append((lane.opens_at, next(tie), lane.worker_id, None))
    heapq.heapify(events)

    queue = [*ahead, task, *behind]
    mine = len(ahead)
    # Each kind's waiting positions, in order; a kind's head is its first task not started.
    positions: dict[str, list[int]] = {}
    for index, waiter in enumerate(queue):
        positions.setdefault(waiter.kind, []).append(index)
    heads = {kind: 0 for kind in positions}
    blocked = [(indexes[0], kind) for kind, indexes in positions.items()]
    at = now
    while True:
        trying, blocked = blocked, []
        heapq.heapify(trying)
        while trying:
            index, kind = heapq.heappop(trying)
            waiter = queue[index]
            where = _best_fit(waiter, order, free, opens, gpu_workers, at)
            if where is None:
                blocked.append((index, kind))
                continue
            need = waiter.needs[where]
            gpus = sorted(free[where].gpus & need.usable)[: need.gpu_count]
            if index == mine:
                return Start(at, where, outset[where].missing(need))
            free[where] = free[where].minus(need.cpu, need.mem, gpus)
            ends = Holding("", need.cpu, need.mem, frozenset(gpus), at + waiter.run_sec, "replay")
            heapq.heappush(events, (at + waiter.run_sec, next(tie), where, ends))
            heads[kind] += 1
            if heads[kind] < len(positions[kind]):
                heapq.heappush(trying, (positions[kind][heads[kind]], kind))
        if not events:
            return None
        # One end at a time, even where several fall on one moment: real runs never end together, and
        # a pass between two ends lets a small task take what the first gave back.
        at, _, worker_id, given = heapq.heappop(events)
        if given is not None:
            free[worker_id] = free[worker_id].plus(given)


def _best_fit(
    waiter: Waiter,
    order: Sequence[str],
    free: Mapping[str, Capacity],
    opens: Mapping[str, float],
    gpu_workers: set[str],
    at: float,
) -> str | None:
    best: tuple[tuple[int, int, int], int] | None = None
    where = None
    for rank, worker_id in enumerate(order):
        need = waiter.needs.get(worker_id)
        if need is None or opens[worker_id] > at or not free[worker_id].fits(need):
            continue
        room = free[worker_id]
        score = (packing(need.gpu_count, len(room.gpus), room.slots, worker_id in gpu_workers), rank)
        if best is None or score < best:
            best, where = score, worker_id
    return where
