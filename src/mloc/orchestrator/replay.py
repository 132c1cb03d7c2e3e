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

Backfill holds (:mod:`.backfill`) are replayed when asked for (``backfill_after``): from the moment
the first task in queue order has waited that long, a hold keeps the worker where it can start
soonest (:func:`.shadow.shadow_time`) for it, and another task starts there only if the hold admits it
(:meth:`.shadow.Hold.admits`: it ends before the shadow time, or leaves the held task's need free);
once the held task starts, the next in line may take a hold. So a big task in a stream of small ones
is told when its hold lets it start, not when the stream ends. One hold at a time, as for real, but
chosen among the tasks replayed here (those the workers asked about can run).

Fair share between owners (:mod:`.fairshare`) is replayed when given (``shares``): at each moment the
waiting tasks are taken by priority, then by their owner's decayed cost and tasks held over their
weight, then in queue order, as a pass takes them; a task starting moves its owner back by a typical
task's cost, and one ending (running now or replayed) adds what it ran to its owner's cost and moves
the typical cost. So a user's task behind another user's backlog is told when fair share lets it in,
not when the backlog ends. Costs are not decayed over the replay (a half-life is hours, a replay
minutes).

Waiting tasks of one owner and request are one *kind* here: if the first of them does not fit at a
moment, none does, so a moment costs a look per kind, not per task, and a long queue of a few kinds
replays fast.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from mloc.budgetunits import DEFAULT_WEIGHT
from mloc.orchestrator import fairshare
from mloc.orchestrator.placement import packing
from mloc.orchestrator.shadow import Capacity, Hold, Holding, Need, shadow_time
from mloc.transition import fair_share_cost


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
    its kind (waiters of one kind have the same needs and run); ``since``: when it began to wait
    (unix seconds; None: it takes no backfill hold in the replay)."""

    kind: str
    needs: Mapping[str, Need]
    run_sec: float
    since: float | None = None
    owner: str = ""
    priority: int = 0


@dataclass
class Shares:
    """Fair share as a pass sees it: each owner's decayed cost and count of finished tasks, weight and
    tasks held now (assigned or running, on any worker); what a typical recent task costs follows
    from the costs and counts (:func:`.fairshare.typical_cost`). With ``half_life_sec``, costs and
    counts go on decaying as the replay's clock (``at``) moves, as they do between real passes."""

    cost: dict[str, float] = field(default_factory=dict)
    count: dict[str, float] = field(default_factory=dict)
    weight: dict[str, float] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    half_life_sec: float | None = None
    at: float = 0.0
    unit: float = field(init=False)

    def __post_init__(self) -> None:
        self._measure_unit()

    def _measure_unit(self) -> None:
        self.unit = fairshare.typical_cost((self.cost[owner], self.count.get(owner, 0.0)) for owner in self.cost)

    def key(self, owner: str) -> float:
        weight = self.weight.get(owner, DEFAULT_WEIGHT)
        return fairshare.share_key(self.cost.get(owner, 0.0), self.held.get(owner, 0), self.unit, weight)

    def advance(self, at: float) -> None:
        """Decay every standing to ``at`` (the typical cost, a ratio of the two, stays as it is)."""
        if self.half_life_sec and at > self.at:
            for values in (self.cost, self.count):
                for owner, value in values.items():
                    values[owner] = fairshare.decayed(value, self.at, at, self.half_life_sec)
        self.at = max(self.at, at)

    def ended(self, owner: str, cost: float) -> None:
        """A task of ``owner`` ended, adding ``cost`` (:func:`.transition.fair_share_cost`)."""
        self.held[owner] = max(0, self.held.get(owner, 0) - 1)
        self.cost[owner] = self.cost.get(owner, 0.0) + cost
        self.count[owner] = self.count.get(owner, 0.0) + 1
        self._measure_unit()


def _cost(gpus: int, seconds: float) -> float:
    return fair_share_cost({"gpu_seconds": gpus * seconds, "wall_sec": seconds})


@dataclass(frozen=True)
class Start:
    """Where and when the task starts, and what it lacked there at the outset (missing GPUs, slots,
    CPU, memory, as :meth:`Capacity.missing` counts them); ``held``: a replayed backfill hold kept
    other tasks off a worker for it."""

    at: float
    worker_id: str
    lacked: tuple[int, int, int, int]
    held: bool = False


@dataclass
class HeldTask:
    """A backfill hold in the replay: the queue position of its task, and the hold itself."""

    index: int
    hold: Hold


def replay(
    lanes: Sequence[Lane],
    ahead: Sequence[Waiter],
    task: Waiter,
    now: float,
    behind: Sequence[Waiter] = (),
    backfill_after: float | None = None,
    shares: Shares | None = None,
    standing: HeldTask | None = None,
) -> Start | None:
    """When ``task`` starts behind ``ahead`` and before ``behind`` (both in queue order) on ``lanes``;
    None if it never does (no lane it can use ever frees enough, or a hold keeps it off the only one
    for good). A task behind that fits while ``task`` does not takes what it fits first, as in a pass.
    ``backfill_after``: replay backfill holds for the tasks that have waited this many seconds;
    ``shares``: take the waiting tasks in fair-share order (else in queue order); ``standing``: the hold
    that stands now (for a task ahead), kept until its task starts."""
    free = {lane.worker_id: lane.free for lane in lanes}
    opens = {lane.worker_id: lane.opens_at for lane in lanes}
    order = [lane.worker_id for lane in lanes]
    gpu_workers = {lane.worker_id for lane in lanes if lane.gpu_worker}
    outset = dict(free)
    # What each lane has yet to give back, for a hold's shadow time.
    owed: dict[str, list[Holding]] = {worker_id: [] for worker_id in order}
    # (moment, tie-break, worker, what comes back); a lane opening later, or a task's wait reaching
    # ``backfill_after``, gives back nothing.
    events: list[tuple[float, int, str, Holding | None]] = []
    tie = itertools.count()
    for lane in lanes:
        for given in lane.holdings:
            if given.ends_at is None:
                raise ValueError(f"holding {given.task_id} on {lane.worker_id} has no end to replay")
            events.append((max(now, given.ends_at), next(tie), lane.worker_id, given))
            owed[lane.worker_id].append(given)
        if lane.opens_at > now:
            events.append((lane.opens_at, next(tie), lane.worker_id, None))

    queue = [*ahead, task, *behind]
    mine = len(ahead)
    if backfill_after is not None:
        for waiter in queue:
            if waiter.since is not None and waiter.since + backfill_after > now:
                events.append((waiter.since + backfill_after, next(tie), "", None))
    heapq.heapify(events)
    if shares is not None:  # counted on here, not in the caller's
        shares = replace(shares, cost=dict(shares.cost), count=dict(shares.count), held=dict(shares.held), at=now)

    def rank(index: int) -> tuple[int, float, int]:
        waiter = queue[index]
        return (-waiter.priority, 0.0 if shares is None else shares.key(waiter.owner), index)

    # Each kind's waiting positions, in order; a kind's head is its first task not started.
    positions: dict[tuple[str, str], list[int]] = {}
    for index, waiter in enumerate(queue):
        positions.setdefault((waiter.owner, waiter.kind), []).append(index)
    heads = {kind: 0 for kind in positions}
    blocked = [indexes[0] for indexes in positions.values()]
    at = now
    kept_for: set[int] = set()  # queue positions of held tasks for which a hold kept another off
    if standing is not None:  # taken from here, not from the caller's
        standing = HeldTask(standing.index, replace(standing.hold))
    while True:
        held = standing
        if held is None and backfill_after is not None:
            heads_now = (indexes[heads[kind]] for kind, indexes in positions.items() if heads[kind] < len(indexes))
            held = _hold(queue, sorted(heads_now), backfill_after, order, free, owed, at)
        trying = [rank(index) for index in blocked]
        blocked = []
        heapq.heapify(trying)
        while trying:
            ranked = heapq.heappop(trying)
            index = ranked[2]
            if shares is not None and rank(index) != ranked:
                heapq.heappush(trying, rank(index))  # its owner started a task meanwhile: moved back
                continue
            waiter = queue[index]
            kind = (waiter.owner, waiter.kind)
            hold = None if held is None or held.index == index else held.hold
            where, kept_off = _best_fit(waiter, order, free, opens, gpu_workers, at, hold)
            if kept_off and held is not None:
                kept_for.add(held.index)
            if where is None:
                blocked.append(index)
                continue
            need = waiter.needs[where]
            gpus = sorted(free[where].gpus & need.usable)[: need.gpu_count]
            if index == mine:
                return Start(at, where, outset[where].missing(need), held=index in kept_for)
            if held is not None and held.index == index:
                held = standing = None  # placed: the hold goes, and the next pass chooses another
            elif hold is not None and where == hold.worker_id:
                hold.take(need.cpu, need.mem, gpus, waiter.run_sec, at)
            free[where] = free[where].minus(need.cpu, need.mem, gpus)
            ends = Holding("", need.cpu, need.mem, frozenset(gpus), at + waiter.run_sec, "replay", waiter.owner, at)
            heapq.heappush(events, (at + waiter.run_sec, next(tie), where, ends))
            owed[where].append(ends)
            if shares is not None:
                shares.held[waiter.owner] = shares.held.get(waiter.owner, 0) + 1
            heads[kind] += 1
            if heads[kind] < len(positions[kind]):
                heapq.heappush(trying, rank(positions[kind][heads[kind]]))
        if not events:
            return None
        # One end at a time, even where several fall on one moment: real runs never end together, and
        # a pass between two ends lets a small task take what the first gave back.
        at, _, worker_id, returned = heapq.heappop(events)
        if shares is not None:
            shares.advance(at)
        if returned is not None:
            free[worker_id] = free[worker_id].plus(returned)
            owed[worker_id].remove(returned)
            if shares is not None and returned.owner:
                ran = at - returned.since if returned.since is not None else 0.0  # unknown start: no cost
                shares.ended(returned.owner, _cost(len(returned.gpus), max(0.0, ran)))


def _hold(
    queue: Sequence[Waiter],
    heads: Sequence[int],
    after: float,
    order: Sequence[str],
    free: Mapping[str, Capacity],
    owed: Mapping[str, Sequence[Holding]],
    at: float,
) -> HeldTask | None:
    """The hold a pass at ``at`` would make: for the first task (of the kinds' ``heads``, in queue
    order) that has waited ``after``, on the lane where it can start soonest."""
    for index in heads:
        waiter = queue[index]
        if waiter.since is None or at - waiter.since < after:
            continue
        best: Hold | None = None
        for worker_id in order:
            need = waiter.needs.get(worker_id)
            if need is None:
                continue
            shadow = shadow_time(need, free[worker_id], owed[worker_id], at)
            if shadow is None or shadow.at is None:
                continue
            if best is not None and best.at is not None and shadow.at >= best.at:
                continue
            best = Hold("", worker_id, shadow.at, need, shadow.free, short="")
        return None if best is None else HeldTask(index, best)
    return None


def _best_fit(
    waiter: Waiter,
    order: Sequence[str],
    free: Mapping[str, Capacity],
    opens: Mapping[str, float],
    gpu_workers: set[str],
    at: float,
    hold: Hold | None = None,
) -> tuple[str | None, bool]:
    """The lane a pass would place ``waiter`` on at ``at`` (None: none now), and whether ``hold``, a
    backfill hold for another task, kept it off the held lane (it must admit the waiter there)."""
    best: tuple[tuple[int, int, int], int] | None = None
    where = None
    kept_off = False
    for rank, worker_id in enumerate(order):
        need = waiter.needs.get(worker_id)
        if need is None or opens[worker_id] > at or not free[worker_id].fits(need):
            continue
        room = free[worker_id]
        if hold is not None and worker_id == hold.worker_id:
            gpus = sorted(room.gpus & need.usable)[: need.gpu_count]
            if not hold.admits(need.cpu, need.mem, gpus, waiter.run_sec, at):
                kept_off = True
                continue
        score = (packing(need.gpu_count, len(room.gpus), room.slots, worker_id in gpu_workers), rank)
        if best is None or score < best:
            best, where = score, worker_id
    return where, kept_off
