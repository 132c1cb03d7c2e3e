"""Where a waiting task stands in the queue, and about when it starts.

The estimate replays the queue on the resources of the workers that could run the task
(:mod:`.replay`): each worker gives back the GPUs, CPU, memory and slot of a task it holds when that
task is expected to end (its progress ETA, else the usual run of its kind, else its timeout:
:func:`.shadow.expected_end`; one with none of these is counted as a kind never seen), the tasks
ahead take, in queue order, whatever fits them as it frees, each for its usual run, and the task
starts at the first moment it fits. A kind's usual run is the median of the recent successes of the
same task type, model and topic (``DurationHistory``, read from the succeeded tasks' index and kept
for a short while). A backfill hold (:mod:`.backfill`) counts: the task it is for starts when its
held worker frees enough for it (the hold's shadow time); when that task is ahead of the one asked
about, the hold is replayed on every task until it starts, else a task the hold keeps off that worker
starts nothing there before then. After it (or while none stands) the replay foresees the holds to
come: a task that will have waited ``MLOC_BACKFILL_AFTER_SEC`` by then takes one, as a pass would
give it. Where the queue holds several users' tasks, they are taken in fair-share order (:func:`shares`
reads each user's standing, weight and tasks held, as a pass does), so a task behind another user's
backlog is told when fair share lets it in. A task its owner's exhausted budget holds is told when
the budget resets, and one its owner's quota holds that it waits for one of the owner's tasks to end
(no figure: the replay does not model quotas); the tasks ahead that a quota or budget holds take no
room in the replay. It is an estimate: a worker that joins or leaves changes it, and so
do tasks submitted later by a user who then goes first.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.orchestrator import budgets
from mloc.orchestrator.placement import Request, WaitCode, fits_registration
from mloc.orchestrator.replay import HeldTask, Lane, Shares, Waiter, replay
from mloc.orchestrator.shadow import Hold, Holding, capacity_of, describe_missing, in_words, need_of
from mloc.orchestrator.standing import Standings
from mloc.records import PENDING_CODE, WorkerStatus, WorkerView
from mloc.settings import DEFAULT_FAIR_SHARE_HALF_LIFE_SEC
from mloc.state import TaskState
from mloc.store import TaskStore

# Recent successes read per refresh, and how long the medians are kept.
HISTORY_TASKS = 500
HISTORY_TTL_SEC = 30.0
# Tasks ahead looked at, at most (an estimate for a task behind more says at least this long), and
# tasks behind, which may take what frees while the task does not fit.
AHEAD_LIMIT = 2000
BEHIND_LIMIT = 500
# The duration assumed for a kind with no success yet.
UNKNOWN_DURATION_SEC = 60.0
HOLDING_CODES = frozenset(code.value for code in WaitCode)


def kind_of(req: dict[str, Any]) -> str:
    return f"{req.get('task_type', '')}|{req.get('model') or ''}|{req.get('topic', '')}"


class DurationHistory:
    """Median run time of recent successes, by task type, model and topic."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._medians: dict[str, float] = {}
        self._by_type: dict[str, float] = {}
        self._read_at = 0.0

    async def duration(self, req: dict[str, Any]) -> tuple[float, str]:
        """The usual run time of ``req``'s kind, and what it is based on."""
        if time.monotonic() - self._read_at > HISTORY_TTL_SEC:
            await self._refresh()
        kind = kind_of(req)
        if kind in self._medians:
            return self._medians[kind], "history"
        task_type = str(req.get("task_type", ""))
        if task_type in self._by_type:
            return self._by_type[task_type], "history of its task type"
        return UNKNOWN_DURATION_SEC, "no history"

    async def _refresh(self) -> None:
        ids = await self.store.redis.zrevrange(keys.tasks_in_state(TaskState.SUCCEEDED), 0, HISTORY_TASKS - 1)
        pipe = self.store.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(keys.task(task_id), "req", "started_at", "finished_at", "group_size", "assigned_at")
        runs: dict[str, list[float]] = {}
        by_type: dict[str, list[float]] = {}
        for raw, started, finished, group, assigned in await pipe.execute():
            if not raw or not started or not finished or group:
                continue  # a group's parent has no run of its own
            req = json.loads(raw)
            # A slot is busy from the task's placement to its end, not only while it runs.
            took = max(0.0, float(finished) - float(assigned or started))
            runs.setdefault(kind_of(req), []).append(took)
            by_type.setdefault(str(req.get("task_type", "")), []).append(took)
        self._medians = {kind: statistics.median(values) for kind, values in runs.items()}
        self._by_type = {kind: statistics.median(values) for kind, values in by_type.items()}
        self._read_at = time.monotonic()


@dataclass(frozen=True)
class HeldWorker:
    """The backfill hold (:mod:`.backfill`) as it bears on one waiting task's start."""

    worker_id: str
    free_at: float | None  # the shadow time (unix seconds): when the held task can start; None if unknown
    mine: bool  # the worker is held for this task
    keeps_off: bool  # this task may not start on the held worker before the held task has


# The tasks each of the workers named holds, with their expected ends (:meth:`.Backfill.holdings`).
HoldingsReader = Callable[[list[str]], Awaitable[dict[str, list[Holding]]]]
# Fair share among the owners named, as a pass would order them (:func:`shares`).
SharesReader = Callable[[list[str]], Awaitable[Shares]]


async def shares(redis: aioredis.Redis, standings: Standings, owners: list[str]) -> Shares:
    """The owners' fair-share standing, weight and tasks held now, and the typical task cost among
    them, as a scheduling pass reads them (:mod:`.queues`, :mod:`.fairshare`)."""
    found = await standings.read(owners)
    pipe = redis.pipeline(transaction=False)
    for owner in owners:
        pipe.hget(keys.user_usage(owner), "tasks")
    held = await pipe.execute()
    return Shares(
        cost={owner: standing.cost for owner, standing in found.items()},
        count={owner: standing.count for owner, standing in found.items()},
        weight={owner: standing.weight for owner, standing in found.items()},
        held={owner: int(tasks or 0) for owner, tasks in zip(owners, held, strict=True)},
        half_life_sec=standings.half_life_sec,
    )


@dataclass
class Estimate:
    position: int | None  # 1-based place in the pending order; None while a retry waits out its backoff
    ahead: int  # placeable tasks before it that the same workers could run
    eta_sec: float | None  # seconds from now until it starts; None when no worker could run it
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "ahead": self.ahead,
            "eta_sec": None if self.eta_sec is None else round(self.eta_sec, 1),
            "basis": self.basis,
        }


async def estimate(
    store: TaskStore,
    history: DurationHistory,
    views: list[WorkerView],
    task_id: str,
    req: dict[str, Any],
    hold: HeldWorker | None = None,
    *,
    holdings_of: HoldingsReader,
    since: float | None = None,
    backfill_after: float | None = None,
    owner: str = "",
    priority: int = 0,
    shares_of: SharesReader | None = None,
    standing: Hold | None = None,
) -> Estimate:
    """The queue position and start estimate of the pending task ``task_id`` (whose request is ``req``);
    ``hold``: how a backfill hold bears on it; ``holdings_of``: what its workers hold, and until when;
    ``since``: when it began to wait; ``backfill_after``: replay the backfill holds to come, for the tasks
    that have waited this long (None: none); ``owner``, ``priority``: the
    task's; ``shares_of``: take the waiting tasks of several owners in fair-share order; ``standing``: the
    hold that stands now, replayed as a hold on every task until its own starts when that task is ahead
    of this one (then the holds to come are foreseen after it); else only ``hold`` counts."""
    redis = store.redis
    rank = await redis.zrank(keys.PENDING, task_id)
    position = None if rank is None else rank + 1
    request = Request.from_json(req)
    fitting = [v for v in views if v.status == WorkerStatus.ACTIVE and fits_registration(request, v)]
    if not fitting:
        return Estimate(position, 0, None, "no registered worker can run it")
    now = time.time()
    waits = await _owner_holds(store, request, task_id, owner, holdings_of, now)
    if waits is not None:
        eta_sec, why = waits
        return Estimate(position, 0, eta_sec, why)
    if hold is not None and hold.mine and hold.free_at is not None:
        # The hold was placed where it starts soonest, from what it needs (GPUs, memory), not slots alone.
        return Estimate(position, 0, max(0.0, hold.free_at - now), f"the worker held for it, {hold.worker_id}")
    ahead, behind, ahead_ids = await _queue(store, history, fitting, rank)
    seeded = None
    if standing is not None and standing.at is not None and standing.task_id in ahead_ids:
        seeded = HeldTask(ahead_ids.index(standing.task_id), standing)
    elif standing is not None:
        backfill_after = None  # one hold at a time: none to come while this one stands
    held = await holdings_of([view.worker_id for view in fitting])
    lanes: list[Lane] = []
    unknown_ends: dict[str, int] = {}
    for view in fitting:
        opens_at = now
        if seeded is None and hold is not None and hold.keeps_off and view.worker_id == hold.worker_id:
            if hold.free_at is None:
                continue  # not before the held task starts, and when that is nobody knows
            opens_at = hold.free_at
        holdings = []
        for holding in held.get(view.worker_id, []):
            if holding.ends_at is None:
                # Nothing says when it ends: counted as a task of a kind never seen, from now.
                unknown_ends[view.worker_id] = unknown_ends.get(view.worker_id, 0) + 1
                holding = replace(holding, ends_at=now + UNKNOWN_DURATION_SEC)
            holdings.append(holding)
        lanes.append(Lane(view.worker_id, capacity_of(view), tuple(holdings), opens_at, gpu_worker=bool(view.gpus)))
    if not lanes:
        assert hold is not None  # only a hold takes a fitting worker out
        why = f"its only worker, {hold.worker_id}, is held for an older task whose start is unknown"
        return Estimate(position, 0, None, why)
    run_sec, basis = await history.duration(req)
    needs = {view.worker_id: need_of(request, view) for view in fitting}
    own = Waiter(json.dumps(req, sort_keys=True), needs, run_sec, since, owner, priority)
    owners = sorted({owner, *(waiter.owner for waiter in (*ahead, *behind))})
    fair = await shares_of(owners) if shares_of is not None and len(owners) > 1 else None
    start = replay(lanes, ahead, own, now, behind, backfill_after, fair, seeded)
    if start is None:
        return Estimate(position, len(ahead), None, "the workers it fits never free enough of it at once")
    eta_sec = start.at - now
    if rank is None:
        retry_at = await redis.zscore(keys.RETRY_WAIT, task_id)
        if retry_at is not None:
            eta_sec = max(eta_sec, float(retry_at) - now)
        basis += "; a retry waiting out its backoff"
    if rank is not None and rank > AHEAD_LIMIT:
        basis += f"; only the first {AHEAD_LIMIT:,} of the {rank:,} tasks waiting ahead were counted"
    if start.held and backfill_after is not None:  # the hold kept others off for it
        basis += f"; {start.worker_id} held for it once it has waited {in_words(backfill_after)}"
    if hold is not None and hold.keeps_off:
        basis += f"; not on {hold.worker_id} before the older task held there starts"
    elif hold is not None and hold.mine:
        basis += f"; {hold.worker_id} is held for it, its start unknown"
    if start.at > now:
        unknown = unknown_ends.get(start.worker_id, 0)
        if unknown:
            tasks = f"{unknown} task has" if unknown == 1 else f"{unknown} tasks have"
            counted = in_words(UNKNOWN_DURATION_SEC)
            basis += f"; {tasks} no known end on {start.worker_id} (counted as {counted} from now)"
        gpus, _, cpu, mem = start.lacked
        if gpus or cpu or mem:
            basis += f"; {describe_missing((gpus, 0, cpu, mem))} free on {start.worker_id} then, as its tasks end"
    return Estimate(position, len(ahead), eta_sec, basis)


async def _owner_holds(
    store: TaskStore, request: Request, task_id: str, owner: str, holdings_of: HoldingsReader, now: float
) -> tuple[float | None, str] | None:
    """When the owner's exhausted budget or quota, not the fleet, keeps the task waiting: the seconds
    until it may start (None when nothing says) and what that rests on; None when neither holds it. A
    replay of the queue would tell when room frees, which is not what it waits for.

    A budget is named: the one that resets last, which may not be the one the task's ``pending_reason``
    gives. A quota is not: its words (the limit, the admin's command) are that ``pending_reason``, which
    the record shows beside the estimate."""
    redis = store.redis
    found = (await Standings(redis, half_life_sec=DEFAULT_FAIR_SHARE_HALF_LIFE_SEC).read([owner], now))[owner]
    spent = budgets.last_to_reset(found.exhausted, request)
    if spent is not None:
        resets = datetime.fromtimestamp(spent.resets_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        why = f"waits for its owner's budget to reset at {resets}, or for the admin to raise it ({spent.reason})"
        return max(0.0, spent.resets_at - now), why
    code, never = await redis.hmget(keys.task(task_id), PENDING_CODE, "unschedulable")
    if code != WaitCode.QUOTA:
        return None
    if never == "1":
        return None, "can never start under its owner's current quota"
    why = f"waits for one of {owner}'s tasks to end"
    first = await _first_end_of(store, owner, holdings_of, now)
    if first is not None:
        why += f"; the first of them is expected to end in about {in_words(first - now)}"
    return None, why


async def _first_end_of(store: TaskStore, owner: str, holdings_of: HoldingsReader, now: float) -> float | None:
    """When the first of ``owner``'s assigned or running tasks is expected to end (None: none says)."""
    redis = store.redis
    pipe = redis.pipeline(transaction=False)
    for state in (TaskState.ASSIGNED, TaskState.RUNNING):
        pipe.zinter([keys.tasks_in_state(state), keys.tasks_of_owner(owner)])
    mine = {task_id for found in await pipe.execute() for task_id in found}
    if not mine:
        return None
    pipe = redis.pipeline(transaction=False)
    for task_id in sorted(mine):
        pipe.hget(keys.task(task_id), "worker_id")
    workers = sorted({worker_id for worker_id in await pipe.execute() if worker_id})
    held = await holdings_of(workers)
    ends = [h.ends_at for found in held.values() for h in found if h.task_id in mine and h.ends_at is not None]
    return max(now, min(ends)) if ends else None


async def _queue(
    store: TaskStore, history: DurationHistory, fitting: list[WorkerView], rank: int | None
) -> tuple[list[Waiter], list[Waiter], list[str]]:
    """The placeable tasks the ``fitting`` workers could run before and after the one at ``rank`` in
    the pending order (none after a retry waiting out its backoff: it is not in that order), in
    order, as the replay takes them; and the ids of those before it."""
    if rank is None:
        return [], [], []
    redis = store.redis
    ahead_ids = await redis.zrange(keys.PENDING, 0, min(rank, AHEAD_LIMIT) - 1) if rank else []
    behind_ids = await redis.zrange(keys.PENDING, rank + 1, rank + BEHIND_LIMIT)
    pipe = redis.pipeline(transaction=False)
    for other_id in [*ahead_ids, *behind_ids]:
        pipe.hmget(keys.task(other_id), "req", "created_at", "owner", "priority", PENDING_CODE)
    kinds: dict[str, Waiter | None] = {}
    waiters: list[Waiter | None] = []
    for raw, created_at, owner, priority, code in await pipe.execute():
        if not raw:
            waiters.append(None)  # placed or gone meanwhile
            continue
        if code in HOLDING_CODES:
            # Its owner's quota or budget holds it: it takes no room while it waits for that.
            waiters.append(None)
            continue
        if raw not in kinds:
            other = json.loads(raw)
            request = Request.from_json(other)
            needs = {v.worker_id: need_of(request, v) for v in fitting if fits_registration(request, v)}
            kinds[raw] = Waiter(raw, needs, (await history.duration(other))[0]) if needs else None
        kind = kinds[raw]  # None where it runs elsewhere
        if kind is not None:
            since = float(created_at) if created_at else None
            kind = replace(kind, since=since, owner=owner or "", priority=int(priority or 0))
        waiters.append(kind)
    cut = len(ahead_ids)
    ahead = [(task_id, w) for task_id, w in zip(ahead_ids, waiters[:cut], strict=True) if w is not None]
    behind = [w for w in waiters[cut:] if w is not None]
    return [w for _, w in ahead], behind, [task_id for task_id, _ in ahead]
