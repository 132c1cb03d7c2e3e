"""Reservations for big waiting tasks, and the backfill they allow (EASY backfill, as Slurm does).

Without them a task that needs a whole worker can wait forever: whenever one of that worker's GPUs
frees, a smaller task that fits takes it. So the scheduling passes (each full one, and any once
``REPLAN_SEC`` has passed since the last choice) give one waiting task a *hold*: the first
(highest priority, then oldest) that has waited ``MLOC_BACKFILL_AFTER_SEC`` and that some active
worker's registration fits. If it fits no worker now, the hold is on the worker
where it can start soonest, from the *shadow time* when enough of it frees (:func:`.shadow_time`);
if it fits one now, the hold keeps that worker for it until the pass reaches it, so fair share's
order cannot hand its room to a younger task first.

While the hold stands, another task may start on the held worker only if

- it leaves free what the held task needs at the shadow time (it uses the worker's surplus), or
- it is expected to end before the shadow time: its usual run is the median of past runs of its
  kind (task type, model, topic; :class:`~mloc.orchestrator.eta.DurationHistory`), at most its
  timeout, else its timeout; a task with neither is not expected to end at any time.

Other workers are unaffected. Both the pass (:meth:`Scheduler.choose`) and a submit's placement
(:meth:`Scheduler.place`) obey it. A running task's expected end is its progress ETA, else the
median run of its kind (or of its task type), else its timeout (:func:`.expected_end`). A wrong
guess there moves only the shadow time; a wrong guess about a task being backfilled would delay
the held task, hence the stricter rule for those.

The hold is kept in Redis (:data:`mloc.keys.BACKFILL_HOLD`, written as it is chosen, with a TTL) so
every orchestrator's placements obey it, and a dead orchestrator's hold lapses. It goes when its
task is placed, and is not made again for a task that is cancelled, no longer fits any worker, or
was held back by its owner's limits in the last pass.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from mloc import keys
from mloc.orchestrator.eta import DurationHistory, HeldWorker, kind_of
from mloc.orchestrator.placement import Request, fits_now, fits_registration, usable_gpus
from mloc.orchestrator.shadow import Hold, Holding, Shadow, capacity_of, expected_end, need_of, shadow_time
from mloc.records import WorkerStatus, WorkerView
from mloc.store import TaskStore

log = logging.getLogger(__name__)
# A hold not written again this long (its orchestrator stopped) lapses; longer where the passes
# that write it come further apart (three of their gaps).
HOLD_TTL_SEC = 15.0
HOLD_TTL_MAX_SEC = 600.0
# How long a hold read from Redis is used before it is read again (by a submit's placement).
READ_EVERY_SEC = 0.25
# Workers whose running tasks are read to find the earliest start, at most (those lacking least first).
WORKERS_LOOKED_AT = 32
# Waiting tasks looked at for the hold, at most (most are skipped at once: too young).
HEADS_LOOKED_AT = 64
# Waiting tasks without history whose timeout is read per pass, at most (it lies in the task's spec).
TIMEOUTS_READ = 16
# A quick pass (woken by a task's end) chooses the hold again when the last choice is this old: on a
# busy fleet wake-ups come faster than the steady interval's full passes.
REPLAN_SEC = 1.0


class Waiting(Protocol):
    """What the pass knows of a waiting task."""

    task_id: str
    req_json: str
    priority: int
    created_ms: int


@dataclass(frozen=True)
class Gate:
    """How the hold treats one task: ``run_sec`` is its expected run (None: unknown)."""

    hold: Hold
    run_sec: float | None

    def admits(self, req: Request, gpus: Sequence[int]) -> bool:
        return self.hold.admits(req.cpu, req.mem, gpus, self.run_sec, time.time())


@dataclass
class _Placed:
    """A task on a worker, as read to work out when it ends."""

    worker_id: str
    task_id: str
    cpu: int
    mem: int
    gpus: frozenset[int]
    assigned_at: float | None
    started_at: float | None
    eta: tuple[float, float] | None  # seconds left, as of this unix time
    median: float | None
    owner: str = ""
    timeout: float | None = None


def _kind(req: Request) -> str:
    return kind_of({"task_type": req.task_type, "model": req.model, "topic": req.topic})


def _timeout_of(document: dict[str, Any] | None) -> float | None:
    limit = ((document or {}).get("spec") or {}).get("timeout_sec")
    return float(limit) if isinstance(limit, int | float) and limit > 0 else None


class Backfill:
    """One orchestrator's side of the hold: made in its passes, obeyed by its placements."""

    def __init__(self, store: TaskStore, history: DurationHistory, *, after_sec: float) -> None:
        self.store = store
        self.history = history
        self.after_sec = after_sec
        self.hold: Hold | None = None
        # Tasks held back by their owner's limits in a pass: no hold for them until a pass offers
        # them a worker again (a hold they cannot use would only keep a worker idle).
        self.passed_over: set[str] = set()
        self._stored = False  # a hold may be in Redis (written here, or seen there)
        self._read_at = 0.0
        self._in_pass = False
        self._offered = False
        self._dropped = False
        self._replanned = False  # this pass chose the hold again
        self._planned_at = 0.0  # when it last did (monotonic)
        self._gap = 0.0  # between the last two choices
        self._runs: dict[str, float | None] = {}  # kind -> median run of its kind, None without history
        self._timeouts: dict[str, float | None] = {}  # waiting task id -> its timeout, where read

    @property
    def held_worker(self) -> str | None:
        return None if self.hold is None else self.hold.worker_id

    def holds_for(self, task_id: str) -> bool:
        return self.hold is not None and self.hold.task_id == task_id

    # ------------------------------------------------------------------ placements
    def run_sec(self, req: Request, timeout: float | None) -> float | None:
        """The expected run of a task of ``req``'s kind with ``timeout``: see the module's rules."""
        median = self._runs.get(_kind(req))
        if median is not None:
            return min(median, timeout) if timeout else median
        return timeout

    def admission(self, task_id: str | None, req: Request) -> Gate | None:
        """The gate ``task_id`` passes on the held worker (None: no hold applies to it), from what
        the last pass learnt. The held task offered a worker is noted."""
        if task_id is not None:
            self.passed_over.discard(task_id)
        hold = self.hold
        if hold is None:
            return None
        if task_id == hold.task_id:
            self._offered = True
            return None
        return Gate(hold, self.run_sec(req, self._timeouts.get(task_id or "")))

    async def gate(self, task_id: str, req: Request, document: dict[str, Any] | None) -> Gate | None:
        """:meth:`admission` for a submit's placement: the hold read again when stale, and the
        task's own history and timeout looked up."""
        if self.after_sec <= 0:
            return None
        await self._refresh()
        if self.hold is None or self.hold.task_id == task_id:
            return self.admission(task_id, req)
        await self._learn([req.to_json()])
        timeout = _timeout_of(document)
        if timeout is not None:
            self._timeouts[task_id] = timeout
        return self.admission(task_id, req)

    async def bearing_on(self, task_id: str, req: Request, views: Mapping[str, WorkerView]) -> HeldWorker | None:
        """How the hold bears on the start of waiting task ``task_id``, for its estimate (nothing is noted,
        unlike :meth:`gate`): held for it, or keeping it off the held worker (``views``, by id), or neither."""
        if self.after_sec <= 0:
            return None
        await self._refresh()
        hold = self.hold
        if hold is None:
            return None
        if hold.task_id == task_id:
            return HeldWorker(hold.worker_id, hold.at, mine=True, keeps_off=False)
        view = views.get(hold.worker_id)
        if view is None or not fits_registration(req, view):
            return None
        await self._learn([req.to_json()])
        timeout = self._timeouts.get(task_id)
        if timeout is None:
            timeout = _timeout_of(orjson.loads(await self.store.redis.hget(keys.task(task_id), "spec") or "{}"))
        gpus = usable_gpus(req, view)[: req.gpu_count] if req.gpu_count else []
        admitted = Gate(hold, self.run_sec(req, timeout)).admits(req, gpus)
        return HeldWorker(hold.worker_id, hold.at, mine=False, keeps_off=not admitted)

    def placed(self, task_id: str, worker_id: str, req: Request, gpus: Sequence[int], gate: Gate | None) -> None:
        """A placement chosen: the held task's ends its hold; another on the held worker uses it."""
        hold = self.hold
        if hold is None:
            return
        if task_id == hold.task_id:
            self.hold, self._dropped = None, True
        elif gate is not None and worker_id == hold.worker_id:
            hold.take(req.cpu, req.mem, gpus, gate.run_sec, time.time())

    def reason(self, task_id: str, req: Request, views: Mapping[str, WorkerView]) -> str | None:
        """Why ``task_id`` waits when the hold is the cause: it is the held task, or the held worker
        (in ``views``, by worker id) would take it now but for the hold. None otherwise."""
        hold = self.hold
        if hold is None:
            return None
        now = time.time()
        if task_id == hold.task_id:
            return hold.reason(now)
        view = views.get(hold.worker_id)
        if view is None or not fits_registration(req, view):
            return None
        usable = usable_gpus(req, view) if req.gpu_count else ()
        if fits_now(req, view, usable) is None:
            return None
        return hold.blocked(self.run_sec(req, self._timeouts.get(task_id)), now)

    # ------------------------------------------------------------------ passes
    async def plan(self, waiting: Sequence[Waiting], views: list[WorkerView], *, full: bool) -> None:
        """At the start of a pass (``views`` as it begins): choose the hold again on a full pass, or
        when the last choice is ``REPLAN_SEC`` old; else keep it."""
        self._in_pass, self._offered, self._dropped = True, False, False
        self._replanned = full or time.monotonic() - self._planned_at >= REPLAN_SEC
        if self.after_sec <= 0:
            self.hold = None
            return
        if not self._replanned:
            return
        if self._planned_at:
            self._gap = time.monotonic() - self._planned_at
        self._planned_at = time.monotonic()
        now = time.time()
        ids = {task.task_id for task in waiting}
        self.passed_over &= ids
        self._timeouts = {t: v for t, v in self._timeouts.items() if t in ids}
        self.hold = None
        cutoff_ms = (now - self.after_sec) * 1000
        ripe = [t for t in waiting if t.created_ms <= cutoff_ms and t.task_id not in self.passed_over]
        if not ripe:
            return  # the common case: nothing has waited that long
        ripe.sort(key=lambda t: (-t.priority, t.created_ms))
        live = [v for v in views if v.status == WorkerStatus.ACTIVE]
        for task in ripe[:HEADS_LOOKED_AT]:
            req = Request.from_json(json.loads(task.req_json))
            fitting = [v for v in live if fits_registration(req, v)]
            if fitting:
                self.hold = await self._hold_for(task.task_id, req, fitting, now)
                if self.hold is not None:
                    break
        if self.hold is not None:
            requests = {raw: json.loads(raw) for raw in {task.req_json for task in waiting}}
            await self._learn(requests.values())
            await self._read_timeouts(waiting, requests, views)

    async def settle(self, *, read: set[str]) -> None:
        """At the end of a pass: the hold written (chosen again) or removed (its task was placed).
        ``read``: the waiting tasks the pass looked at."""
        self._in_pass = False
        hold, full = self.hold, self._replanned
        if hold is not None and full and hold.task_id in read and not self._offered:
            # Its owner's limits kept it from every worker: holding one for it would leave it idle.
            self.passed_over.add(hold.task_id)
            self.hold = hold = None
        redis = self.store.redis
        if hold is not None and full:
            ttl = max(HOLD_TTL_SEC, min(3 * self._gap, HOLD_TTL_MAX_SEC))
            await redis.set(keys.BACKFILL_HOLD, orjson.dumps(hold.to_json()), px=int(ttl * 1000))
            self._stored = True
        elif hold is None and (self._dropped or full) and self._stored:
            await redis.delete(keys.BACKFILL_HOLD)
            self._stored = False
        self._read_at = time.monotonic()

    async def forget(self) -> None:
        """Nothing waits: no hold."""
        self.hold, self._planned_at = None, 0.0
        if self._stored:
            await self.store.redis.delete(keys.BACKFILL_HOLD)
            self._stored = False

    # ------------------------------------------------------------------ reading
    async def _refresh(self) -> None:
        """Read the hold again (another orchestrator's pass may have made it), keeping this one's
        own, with the placements it admitted since, while it is the same hold."""
        if self._in_pass or time.monotonic() - self._read_at < READ_EVERY_SEC:
            return
        raw = await self.store.redis.get(keys.BACKFILL_HOLD)
        self._read_at = time.monotonic()
        stored = None
        if raw:
            try:
                stored = Hold.from_json(orjson.loads(raw))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring an unreadable backfill hold in %s (%s)", keys.BACKFILL_HOLD, exc)
        self._stored = stored is not None
        mine = self.hold
        if stored is None or mine is None or (stored.task_id, stored.made_at) != (mine.task_id, mine.made_at):
            self.hold = stored

    async def _learn(self, requests: Iterable[dict[str, Any]]) -> None:
        """Look up the median run of each request's kind (only the kind's own history counts)."""
        for req in requests:
            median, basis = await self.history.duration(req)
            self._runs[kind_of(req)] = median if basis == "history" else None

    async def _hold_for(self, task_id: str, req: Request, fitting: list[WorkerView], now: float) -> Hold | None:
        """The hold for ``task_id`` on the fitting worker where it can start soonest."""
        needs = {v.worker_id: need_of(req, v) for v in fitting}
        free = {v.worker_id: capacity_of(v) for v in fitting}
        for view in fitting:
            if free[view.worker_id].fits(needs[view.worker_id]):
                cap = free[view.worker_id]
                return Hold.of(task_id, view.worker_id, needs[view.worker_id], cap, Shadow(now, cap, ()), now)
        looked = sorted(fitting, key=lambda v: (free[v.worker_id].missing(needs[v.worker_id]), v.worker_id))
        looked = looked[:WORKERS_LOOKED_AT]
        holdings = await self.holdings([v.worker_id for v in looked], now)
        best: tuple[tuple[bool, float, str], str, Shadow] | None = None
        for view in looked:
            wid = view.worker_id
            shadow = shadow_time(needs[wid], free[wid], holdings.get(wid, []), now)
            if shadow is None:
                continue
            rank = (shadow.at is None, shadow.at or 0.0, wid)
            if best is None or rank < best[0]:
                best = (rank, wid, shadow)
        if best is None:
            return None
        _, wid, shadow = best
        return Hold.of(task_id, wid, needs[wid], free[wid], shadow, now)

    async def holdings(self, worker_ids: list[str], now: float | None = None) -> dict[str, list[Holding]]:
        """The tasks each worker holds, with their expected ends (as of ``now``, unix seconds)."""
        now = time.time() if now is None else now
        redis = self.store.redis
        pipe = redis.pipeline(transaction=False)
        for wid in worker_ids:
            pipe.smembers(keys.worker_tasks(wid))
        held = [sorted(ids) for ids in await pipe.execute()]
        pipe = redis.pipeline(transaction=False)
        for ids in held:
            for task_id in ids:
                pipe.hmget(keys.task(task_id), "req", "gpus", "assigned_at", "started_at", "progress", "owner")
        rows = iter(await pipe.execute())
        found: list[_Placed] = []
        for wid, ids in zip(worker_ids, held, strict=True):
            for task_id in ids:
                raw, gpus, assigned, started, progress, owner = next(rows)
                if raw:  # else ended and forgotten meanwhile
                    placed = await self._placed_task(wid, task_id, raw, gpus, assigned, started, progress, now)
                    placed.owner = owner or ""
                    found.append(placed)
        # The timeout lies in the task's spec: read only where nothing else says when it ends.
        unknown = [p for p in found if p.eta is None and p.median is None]
        if unknown:
            pipe = redis.pipeline(transaction=False)
            for p in unknown:
                pipe.hget(keys.task(p.task_id), "spec")
            for p, spec in zip(unknown, await pipe.execute(), strict=True):
                p.timeout = _timeout_of(orjson.loads(spec) if spec else None)
        out: dict[str, list[Holding]] = {}
        for p in found:
            ends_at, basis = expected_end(
                now=now,
                assigned_at=p.assigned_at,
                started_at=p.started_at,
                progress_eta=p.eta,
                median_sec=p.median,
                timeout_sec=p.timeout,
            )
            since = p.started_at or p.assigned_at
            holding = Holding(p.task_id, p.cpu, p.mem, p.gpus, ends_at, basis, p.owner, since)
            out.setdefault(p.worker_id, []).append(holding)
        return out

    async def _placed_task(
        self,
        worker_id: str,
        task_id: str,
        raw: str,
        gpus: str | None,
        assigned: str | None,
        started: str | None,
        progress: str | None,
        now: float,
    ) -> _Placed:
        req = json.loads(raw)
        report = json.loads(progress) if progress else {}
        eta = None
        if report.get("eta_sec") is not None:
            eta = (float(report["eta_sec"]), float(report.get("updated_at") or now))
        # A running task's end may come from its task type's history too: see the module's rules.
        median, basis = await self.history.duration(req)
        return _Placed(
            worker_id,
            task_id,
            int(req.get("cpu") or 0),
            int(req.get("mem") or 0),
            frozenset(json.loads(gpus) if gpus else ()),
            float(assigned) if assigned else None,
            float(started) if started else None,
            eta,
            None if basis == "no history" else median,
        )

    async def _read_timeouts(
        self, waiting: Sequence[Waiting], requests: dict[str, dict[str, Any]], views: list[WorkerView]
    ) -> None:
        """Read the timeouts of a few waiting tasks with no history that the held worker could take
        now: the only way they may start there before the held task does."""
        hold = self.hold
        view = next((v for v in views if hold is not None and v.worker_id == hold.worker_id), None)
        if view is None:
            return
        wanted: list[str] = []
        for task in waiting:
            if len(wanted) >= TIMEOUTS_READ:
                break
            if task.task_id in self._timeouts or (hold is not None and task.task_id == hold.task_id):
                continue
            req = Request.from_json(requests[task.req_json])
            if self._runs.get(_kind(req)) is not None or not fits_registration(req, view):
                continue
            if fits_now(req, view, usable_gpus(req, view) if req.gpu_count else ()) is not None:
                wanted.append(task.task_id)
        if not wanted:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        for task_id in wanted:
            pipe.hget(keys.task(task_id), "spec")
        for task_id, spec in zip(wanted, await pipe.execute(), strict=True):
            self._timeouts[task_id] = _timeout_of(orjson.loads(spec) if spec else None)
