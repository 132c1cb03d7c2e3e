"""Placement: which worker runs a task, with capacity reserved atomically, or why it must wait.

The orchestrator chooses from a snapshot of the registry; the reservation itself is checked again
inside Redis (see :meth:`TaskStore.transition`), so a stale snapshot or a second orchestrator can
never oversubscribe a worker: the reservation fails and the task is tried elsewhere. The same
atomic step counts the task against its owner's quota (tasks assigned or running, GPUs held) and
refuses it when the owner is at a limit.

Which waiting task goes first (the fair-share rule, also in docs/operations.md):

1. Higher ``priority`` first, always: fairness only orders tasks of equal priority.
2. Among equal priorities, the task whose owner has the smallest ``(decayed usage + held) / weight``
   goes first (see :mod:`.fairshare`): decayed usage is their finished work with a half-life
   (MLOC_FAIR_SHARE_HALF_LIFE_SEC), held the tasks they have assigned or running now (counting the
   placements made earlier in the same pass) at what a typical recent task cost, and weight the
   admin's (default 1). So a user who ran little lately goes before one who ran much, users with
   nothing finished take turns, and one user's backlog cannot starve another user's task.
3. Ties go to the task submitted first.

A user at their quota, or with an exhausted budget (:mod:`.budgets`), is skipped (their tasks wait
with the reason, and its :class:`.placement.WaitCode`, which autoscaling demand and the start
estimate read) and the pass goes on with the other users' tasks. A retry waits out its backoff
in a separate index and joins the queues when it is due (:meth:`.queues.PendingQueues.promote_retries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any

import orjson

from mloc import keys, moves
from mloc.orchestrator import budgets, fairshare
from mloc.orchestrator.backfill import Backfill, Gate
from mloc.orchestrator.eta import DurationHistory
from mloc.orchestrator.placement import (
    Request,
    WaitCode,
    explain,
    fits_now,
    fits_registration,
    packing,
    usable_gpus,
)
from mloc.orchestrator.queues import OwnerQueue, PendingQueues, UserLimits
from mloc.orchestrator.standing import Standings
from mloc.records import PENDING_CODE, Assignment, NewTask, WorkerStatus, WorkerView
from mloc.settings import DEFAULT_FAIR_SHARE_HALF_LIFE_SEC
from mloc.state import Refusal
from mloc.store import Apply, Change, Coalescer, Reservation, TaskStore
from mloc.workers import WorkerRegistry

log = logging.getLogger(__name__)
SNAPSHOT_MAX_AGE_SEC = 0.25
# A task no worker fits on a snapshot older than this looks again on a fresh one before it waits, so
# a task sent just after a worker joined goes there at once (at most one extra snapshot this often).
FRESH_SEC = 0.02
PASS_FLOOR = 64  # waiting tasks a scheduling pass looks at even when no worker has room
# Placements a pass makes together. Committed as they are chosen, not once the pass has chosen them
# all, so workers start on the first while the pass chooses the rest: a pass over hundreds of waiting
# tasks would otherwise leave freed workers idle until its end, then fill them all at once.
COMMIT_EVERY = 32


def _score(req: Request, view: WorkerView) -> tuple[int, int, int, int, int]:
    warm = held = 0
    if req.model:
        warm = int(any(key.split(":", 1)[-1] == req.model for key in view.warm_models))
        # Next best to a loaded model: its files on the worker's disk, with no download to wait for.
        held = int(req.model in view.held_models)
    return (-warm, -held, *packing(req.gpu_count, len(view.free_gpus), view.slots_free, bool(view.gpus)))


@dataclass
class Placement:
    worker_id: str | None
    pending_reason: str | None = None
    unschedulable: bool = False
    tried: list[str] = field(default_factory=list)
    quota: str | None = None  # "tasks" or "gpus" when the owner's quota refused the task


def quota_reason(owner: str, limit: str, used: int, most: int, gpus_needed: int = 0) -> str:
    """Why the owner's quota keeps a task waiting, and what lets it start: the user can only wait (or
    cancel), so the reason names the admin's command too, with a limit that would let it start now."""
    if limit == "tasks":
        return (
            f"user {owner} at quota: {used} of {most} concurrent tasks; it starts when one of them ends, "
            f"or once an admin raises the quota: `mloc users set-quota {owner} --max-tasks {used + 1}`"
        )
    if gpus_needed > most:
        return (
            f"user {owner}'s quota allows {most} GPU{'s' if most != 1 else ''} at once and this task needs "
            f"{gpus_needed}: it can never start under the current quota; ask the admin to raise it "
            f"(`mloc users set-quota {owner} --max-gpus {gpus_needed}`) or cancel it"
        )
    return (
        f"user {owner} at quota: {used} of {most} GPUs in use, this task needs {gpus_needed}; it starts when "
        f"their tasks holding GPUs end, or once an admin raises the quota: "
        f"`mloc users set-quota {owner} --max-gpus {used + gpus_needed}`"
    )


def quota_never(limit: str, most: int, gpus_needed: int) -> bool:
    """Whether the quota can never let the task start (lowered since its submit, which refuses such)."""
    return limit == "gpus" and 0 < most < gpus_needed


@dataclass
class Decision:
    """A placement chosen on the snapshot, not yet made in Redis (see :meth:`Scheduler.commit`)."""

    task_id: str
    req: Request
    owner: str
    priority: int
    created_ms: int
    worker: WorkerView
    gpus: list[int]
    document: dict[str, Any] | None = None  # read from the task's record when None
    current_reason: str | None = None


class Scheduler:
    def __init__(
        self,
        store: TaskStore,
        registry: WorkerRegistry,
        *,
        heartbeat_ttl_sec: float,
        limits: UserLimits | None = None,
        backfill_after_sec: float = 0.0,
        history: DurationHistory | None = None,
        fair_share_half_life_sec: float = DEFAULT_FAIR_SHARE_HALF_LIFE_SEC,
    ) -> None:
        self.store = store
        # Fair-share usage and weights, and budgets spent, of the owners a pass or a submit looks at.
        self.standings = Standings(store.redis, half_life_sec=fair_share_half_life_sec)
        # The worker kept for a big task that waited long enough (see :mod:`.backfill`).
        self.backfill = Backfill(store, history or DurationHistory(store), after_sec=backfill_after_sec)
        # Placements asked for by concurrent submits go to Redis together.
        self.mover = Coalescer(store)
        self.registry = registry
        self.heartbeat_ttl_sec = heartbeat_ttl_sec
        self._views: list[WorkerView] = []
        self._views_at = 0.0
        self._lock = asyncio.Lock()
        # The owners' queues of waiting tasks a pass reads, and the retries it promotes into them.
        self.queues = PendingQueues(store, self.standings, limits or UserLimits())
        # Workers whose registration could ever take a request of this shape, for the registrations
        # of ``_fit_registrations`` (the registry's count; cleared whenever one changes).
        self._static_fit: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}
        self._fit_registrations = -1
        # Per request shape, the workers that fit it now as a heap, best first, for one snapshot: a
        # decision costs O(log workers), not a pass over all of them. A view changed by a placement
        # has a new version; its heap entries are re-ranked when they come up.
        self._by_id: dict[str, WorkerView] = {}
        self._versions: dict[str, int] = {}
        self._rankings: dict[Request, list[tuple[tuple[int, ...], int, str]]] = {}
        # The held worker is left out of the rankings (see :meth:`_candidates`): the one they left out.
        self._ranked_without: str | None = None

    def _statically_fitting(self, req: Request, views: list[WorkerView]) -> dict[str, tuple[int, ...]]:
        """Workers whose registration fits ``req``, each with the GPUs (lowest index first) of the
        model and memory it asks for."""
        shape = (
            req.task_type,
            req.topic,
            req.tags,
            req.needs,
            req.cpu,
            req.mem,
            req.gpu_count,
            req.gpu_type,
            req.gpu_mem,
        )
        fit = self._static_fit.get(shape)
        if fit is None:
            fit = {
                view.worker_id: usable_gpus(req, view) if req.gpu_count else ()
                for view in views
                if fits_registration(req, view)
            }
            if len(self._static_fit) > 10_000:
                self._static_fit.clear()
            self._static_fit[shape] = fit
        return fit

    def _candidates(
        self, req: Request, views: list[WorkerView], avoid: frozenset[str], gate: Gate | None = None
    ) -> Iterator[tuple[WorkerView, list[int]]]:
        """Workers that can take ``req`` now, best first, with the GPUs it would get on each: the
        checks of :func:`misfit`, split so the part fixed at registration is done once per shape.
        Asking for the next one means the previous was refused in Redis: it is left out. The worker
        held for a waiting task is offered only where ``gate`` admits the task (see :mod:`.backfill`)."""
        fit = self._statically_fitting(req, views)
        held = self.backfill.held_worker
        if avoid:
            # Replicas of one task go to different workers where they can: a ranking of its own.
            ranked = []
            for view in views:
                gpus = fits_now(req, view, fit.get(view.worker_id))
                if gpus is not None and (view.worker_id != held or gate is None or gate.admits(req, gpus)):
                    ranked.append(((view.worker_id in avoid, *_score(req, view)), view, gpus))
            ranked.sort(key=itemgetter(0))
            yield from ((view, gpus) for _, view, gpus in ranked)
            return
        if held != self._ranked_without:
            self._rankings, self._ranked_without = {}, held
        # The held worker stays out of the rankings, which tasks of one shape share whatever the hold
        # says of each, and is offered beside them to the tasks it admits.
        extra = None
        held_view = self._by_id.get(held) if held is not None else None
        if held_view is not None and held in fit:
            held_gpus = fits_now(req, held_view, fit[held])
            if held_gpus is not None and (gate is None or gate.admits(req, held_gpus)):
                extra = (_score(req, held_view), held_view, held_gpus)
        heap = self._rankings.get(req)
        if heap is None:
            heap = []
            for view in views:
                if view.worker_id != held and fits_now(req, view, fit.get(view.worker_id)) is not None:
                    heap.append((_score(req, view), self._versions.get(view.worker_id, 0), view.worker_id))
            heapq.heapify(heap)
            self._rankings[req] = heap
        while heap or extra is not None:
            top = None
            if heap:
                _, version, worker_id = heap[0]
                view = self._by_id[worker_id]
                gpus = fits_now(req, view, fit.get(worker_id))
                current = self._versions.get(worker_id, 0)
                if gpus is None or version != current:
                    heapq.heappop(heap)
                    if gpus is not None:  # changed by a placement: ranked again
                        heapq.heappush(heap, (_score(req, view), current, worker_id))
                    continue
                top = (view, gpus)
            if extra is not None and (top is None or extra[0] < heap[0][0]):
                yield extra[1], extra[2]
                extra = None
                continue
            if top is None:
                break
            yield top
            if heap and heap[0][2] == worker_id and heap[0][1] == version:
                heapq.heappop(heap)

    def _placed_on(self, view: WorkerView, req: Request, gpus: list[int]) -> None:
        view.cpu_free -= req.cpu
        view.mem_free -= req.mem
        view.slots_free -= 1
        view.free_gpus -= set(gpus)
        self._versions[view.worker_id] = self._versions.get(view.worker_id, 0) + 1

    async def views(self, *, fresh: bool = False) -> list[WorkerView]:
        now = time.monotonic()
        if fresh or now - self._views_at > SNAPSHOT_MAX_AGE_SEC:
            views = await self.registry.snapshot()
            if self.registry.registrations != self._fit_registrations:
                self._static_fit.clear()
                self._fit_registrations = self.registry.registrations
            cutoff = time.time() - self.heartbeat_ttl_sec
            for view in views:
                if view.status == WorkerStatus.ACTIVE and view.last_heartbeat < cutoff:
                    view.status = WorkerStatus.UNRESPONSIVE
            self._views, self._views_at = views, now
            self._by_id = {view.worker_id: view for view in views}
            self._versions = {}
            self._rankings = {}
        return self._views

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No scheduling pass of this orchestrator runs meanwhile: a replica group's submit spreads
        its shards over workers, which a pass taking them from the queue would not do."""
        async with self._lock:
            yield

    def invalidate(self) -> None:
        self._views_at = 0.0

    async def place(
        self,
        task_id: str,
        req: Request,
        *,
        owner: str,
        document: dict[str, Any],
        priority: int,
        created_ms: int,
        avoid: frozenset[str] = frozenset(),
        current_reason: str | None = None,
        create: NewTask | None = None,
    ) -> Placement:
        """Try to place one pending task now; on failure record why it waits. ``create`` is the task's
        new record when it is not stored yet: it is stored with the first placement attempt."""
        placement = Placement(worker_id=None)
        held = await self.standings.holding(owner, req)
        if held is not None:
            # An exhausted budget: no worker is tried; a pass places the task once the budget allows.
            placement.pending_reason = held
            if create is not None:
                held_record = replace(
                    create, pending_reason=held, pending_code=WaitCode.BUDGET.value, unschedulable=False
                )
                await self.store.insert([held_record])
            elif held != current_reason:
                fields = {"pending_reason": held, "unschedulable": "0", PENDING_CODE: WaitCode.BUDGET.value}
                await self.store.set_fields(task_id, fields)
            return placement
        gate = await self.backfill.gate(task_id, req, document)
        for attempt in range(3):
            views = await self.views(fresh=attempt > 0)
            tried = len(placement.tried)
            for view, gpus in self._candidates(req, views, avoid, gate):
                change = self._place_change(task_id, req, owner, document, view.worker_id, gpus)
                outcome = await self.mover.apply(task_id, change, create=create)
                create = None
                placement.tried.append(view.worker_id)
                if outcome.ok:
                    self._placed_on(view, req, gpus)
                    self.backfill.placed(task_id, view.worker_id, req, gpus, gate)
                    placement.worker_id = view.worker_id
                    return placement
                if outcome.error == Refusal.QUOTA:
                    # The owner's limit, not this worker: no other worker would take it either.
                    limit, used, most = outcome.detail.split()
                    placement.quota = limit
                    reason = quota_reason(owner, limit, int(used), int(most), req.gpu_count)
                    never = quota_never(limit, int(most), req.gpu_count)
                    placement.pending_reason, placement.unschedulable = reason, never
                    if reason != current_reason:
                        fields = {
                            "pending_reason": reason,
                            "unschedulable": "1" if never else "0",
                            PENDING_CODE: WaitCode.QUOTA.value,
                        }
                        await self.store.set_fields(task_id, fields)
                    return placement
                if outcome.error != Refusal.CAPACITY:
                    # Cancelled or placed by another orchestrator meanwhile: nothing to do.
                    placement.pending_reason = f"not pending any more ({outcome.error} {outcome.detail})"
                    return placement
            if len(placement.tried) == tried:
                if attempt == 0 and time.monotonic() - self._views_at > FRESH_SEC:
                    continue  # none fits on a snapshot that may predate a worker that just joined
                break  # no worker fits even on paper: a fresh snapshot will not change that now
        views = await self.views()
        reason, never = self._why_waiting(task_id, req, views)
        placement.pending_reason, placement.unschedulable = reason, never
        if create is not None:
            await self.store.insert([replace(create, pending_reason=reason, unschedulable=never)])
        elif reason != current_reason:
            fields = {"pending_reason": reason, "unschedulable": "1" if never else "0", PENDING_CODE: ""}
            await self.store.set_fields(task_id, fields)
        return placement

    def _place_change(
        self, task_id: str, req: Request, owner: str, document: dict[str, Any], worker_id: str, gpus: list[int]
    ) -> Change:
        message = Assignment(task_id, owner, tuple(gpus), document).encode()
        return Change(
            moves.PLACE,
            reserve=Reservation(
                worker_id,
                req.cpu,
                req.mem,
                gpus,
                message,
                user=owner,
                max_tasks=self.queues.limits.tasks,
                max_gpus=self.queues.limits.gpus,
            ),
            fields={
                "assigned_at": repr(time.time()),
                "pending_reason": "",
                "unschedulable": "",
                PENDING_CODE: "",
                "gpus": json.dumps(gpus),
            },
        )

    def choose(
        self, req: Request, views: list[WorkerView], task_id: str | None = None
    ) -> tuple[WorkerView, list[int]] | None:
        """The best worker for ``req`` (of the waiting task ``task_id``; None for a new one) on the
        snapshot, with the GPUs it would take, counted as taken there at once (so the next choice of
        a batch sees it); None when none has room now."""
        gate = self.backfill.admission(task_id, req)
        choice = next(self._candidates(req, views, frozenset(), gate), None)
        if choice is not None:
            self._placed_on(choice[0], req, choice[1])
            self.backfill.placed(task_id or "", choice[0].worker_id, req, choice[1], gate)
        return choice

    def _why_waiting(
        self, task_id: str, req: Request, views: list[WorkerView], fleet: tuple[str, bool] | None = None
    ) -> tuple[str, bool]:
        """The pending reason and whether no worker could ever run the task: the hold's words where
        it is the cause (see :mod:`.backfill`), else :func:`explain`'s on ``views`` (the current
        snapshot), or ``fleet`` where that was already worked out for an identical request."""
        held = self.backfill.reason(task_id, req, self._by_id)
        if held is not None:
            return held, False
        return fleet if fleet is not None else explain(req, views)

    async def commit(self, decisions: list[Decision]) -> list[Placement]:
        """Make placements chosen on the snapshot, all in a few round trips: documents not at hand
        are read in one, and the moves sent in one script call per :data:`mloc.store.BATCH_SIZE`.
        Redis checks each reservation again; a task refused for capacity (the snapshot was stale)
        is tried again on its own, with a fresh one."""
        if not decisions:
            return []
        unread = [d for d in decisions if d.document is None]
        if unread:
            pipe = self.store.redis.pipeline(transaction=False)
            for d in unread:
                pipe.hget(keys.task(d.task_id), "spec")
            for d, raw in zip(unread, await pipe.execute(), strict=True):
                d.document = orjson.loads(raw or "{}")
        changes = [
            Apply(
                d.task_id, self._place_change(d.task_id, d.req, d.owner, d.document or {}, d.worker.worker_id, d.gpus)
            )
            for d in decisions
        ]
        outcomes = await self.store.apply_many(changes)
        placements: list[Placement] = []
        reasons: dict[str, str] = {}
        never: dict[str, bool] = {}
        for d, outcome in zip(decisions, outcomes, strict=True):
            placement = Placement(worker_id=None, tried=[d.worker.worker_id])
            if outcome.ok:
                placement.worker_id = d.worker.worker_id
            elif outcome.error == Refusal.QUOTA:
                limit, used, most = outcome.detail.split()
                placement.quota = limit
                placement.pending_reason = quota_reason(d.owner, limit, int(used), int(most), d.req.gpu_count)
                placement.unschedulable = quota_never(limit, int(most), d.req.gpu_count)
                if placement.pending_reason != d.current_reason:
                    reasons[d.task_id] = placement.pending_reason
                    never[d.task_id] = placement.unschedulable
            elif outcome.error == Refusal.CAPACITY:
                self.invalidate()
                placement = await self.place(
                    d.task_id,
                    d.req,
                    owner=d.owner,
                    document=d.document or {},
                    priority=d.priority,
                    created_ms=d.created_ms,
                    current_reason=d.current_reason,
                )
            else:
                placement.pending_reason = f"not pending any more ({outcome.error} {outcome.detail})"
            placements.append(placement)
        await self.queues.note_reasons(reasons, never, dict.fromkeys(reasons, WaitCode.QUOTA))
        return placements

    async def schedule_pending(self, limit: int = 1000, *, quick: bool = False) -> int:
        """One pass over waiting tasks (about ``limit`` of them; with ``quick``, only about as many as
        the workers have room for); returns how many were placed.

        Tasks are taken by the fair-share rule of this module: priority first, then the user with the
        least decayed usage and holdings for their weight, then submission order. A user at quota is
        passed over for this pass, and so are their tasks an exhausted budget holds.
        """
        async with self._lock:
            await self.queues.promote_retries()
            self.invalidate()
            if quick:
                # About as many waiting tasks as could start now: with thousands queued, reading them
                # all on every completion would cost more than running them.
                free = sum(v.slots_free for v in await self.views() if v.status == WorkerStatus.ACTIVE)
                if not free:
                    # Every placement takes a slot: none can start. The room a wake-up announced went
                    # to the pass before (a burst of ends wakes one more); the steady pass refreshes
                    # the waiting tasks' reasons.
                    return 0
                limit = min(limit, max(PASS_FLOOR, 2 * free))
            owners = await self.queues.read(limit)
            if not owners:
                await self.backfill.forget()
                return 0
            # A request that found no worker in this pass will not find one for an identical request
            # either (capacity only shrinks within a pass), so those are not tried again, keeping a pass
            # cheap when many tasks wait; they wait for the first one's reason, or the hold's where it
            # is the cause (that depends on each task's expected run).
            no_room: dict[str, tuple[str, bool]] = {}  # request -> why it waits, where no worker has room
            reasons: dict[str, str] = {}  # pending reasons to write at the end of the pass
            unschedulable: dict[str, bool] = {}
            codes: dict[str, WaitCode] = {}  # the WaitCode of each reason written, where it is one
            decisions: list[Decision] = []
            placed = 0
            # Chosen on a snapshot (a fresh one where a commit needed it), made COMMIT_EVERY at a time.
            views = await self.views()
            waiting = [task for owner in owners for task in owner.waiting]
            await self.backfill.plan(waiting, views, full=not quick)
            heap: list[tuple[int, float, int, int]] = []
            # What one held task counts for in the fair-share order: a typical recent task's cost.
            unit = fairshare.typical_cost((o.standing.cost, o.standing.count) for o in owners)

            def push(index: int) -> None:
                owner = owners[index]
                if owner.next < len(owner.waiting):
                    head = owner.waiting[owner.next]
                    heapq.heappush(heap, (-head.priority, owner.share_key(unit), head.created_ms, index))

            def wait_all(owner: OwnerQueue, reason: str) -> None:
                for task in owner.waiting[owner.next :]:
                    if task.reason != reason:
                        reasons[task.task_id] = reason
                        codes[task.task_id] = WaitCode.QUOTA
                owner.next = len(owner.waiting)

            for index in range(len(owners)):
                push(index)
            while heap:
                index = heapq.heappop(heap)[3]
                owner = owners[index]
                if 0 < owner.max_tasks <= owner.tasks:
                    wait_all(owner, quota_reason(owner.name, "tasks", owner.tasks, owner.max_tasks))
                    continue
                task = owner.waiting[owner.next]
                owner.next += 1
                req = Request.from_json(json.loads(task.req_json))
                exhausted = owner.standing.exhausted
                held = budgets.holding(exhausted, req, owner=owner.name) if exhausted else None
                if held is not None:
                    if task.reason != held:
                        reasons[task.task_id] = held
                        codes[task.task_id] = WaitCode.BUDGET
                elif owner.max_gpus > 0 and req.gpu_count > 0 and owner.gpus + req.gpu_count > owner.max_gpus:
                    reason = quota_reason(owner.name, "gpus", owner.gpus, owner.max_gpus, req.gpu_count)
                    if task.reason != reason:
                        reasons[task.task_id] = reason
                        codes[task.task_id] = WaitCode.QUOTA
                        unschedulable[task.task_id] = quota_never("gpus", owner.max_gpus, req.gpu_count)
                else:
                    skip = task.req_json in no_room and not self.backfill.holds_for(task.task_id)
                    choice = None if skip else self.choose(req, views, task.task_id)
                    if choice is None:
                        if task.req_json not in no_room:
                            no_room[task.req_json] = explain(req, views)
                        reason, never = self._why_waiting(task.task_id, req, views, no_room[task.req_json])
                        if reason != task.reason:
                            reasons[task.task_id] = reason
                            unschedulable[task.task_id] = never
                    else:
                        decisions.append(
                            Decision(
                                task.task_id,
                                req,
                                owner.name,
                                task.priority,
                                task.created_ms,
                                choice[0],
                                choice[1],
                                current_reason=task.reason,
                            )
                        )
                        owner.tasks += 1
                        owner.gpus += req.gpu_count
                        if len(decisions) == COMMIT_EVERY:
                            placed += sum(p.worker_id is not None for p in await self.commit(decisions))
                            decisions = []
                            # Where Redis refused one for capacity, commit took a fresh snapshot (which
                            # holds every placement made so far): the rest are chosen on that one.
                            views = await self.views()
                push(index)
            placed += sum(p.worker_id is not None for p in await self.commit(decisions))
            await self.backfill.settle(read={task.task_id for task in waiting})
            await self.queues.note_reasons(reasons, unschedulable, codes)
            return placed
