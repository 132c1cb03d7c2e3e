"""The orchestrator's operations, independent of HTTP: submit, dry-run, cancel, cleanup, stats."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, modelroots, orchestrators, stopping
from mloc.artifacts import store_for
from mloc.errors import BadRequest, ConfigError, Conflict, Forbidden, SpecError
from mloc.openai_files import INPUT_FILE_LABEL
from mloc.orchestrator import chunks, eta, groups, harness, pipelines, reaper, training, users
from mloc.orchestrator.admission import Fit, MemoryFit
from mloc.orchestrator.idempotency import Idempotency
from mloc.orchestrator.overspend import Overspend
from mloc.orchestrator.placement import Request, WaitCode, explain, misfit, request_of
from mloc.orchestrator.queues import UserLimits
from mloc.orchestrator.scheduler import Decision, Placement, Scheduler
from mloc.orchestrator.usage import Grouping, UsageReports
from mloc.orchestrator.users import Principal
from mloc.records import NewTask, TaskRecord, WorkerRecord, WorkerView
from mloc.removals import FolderSweeper
from mloc.requeue import Backoff
from mloc.settings import Settings
from mloc.spec import Document, taskgraph, validate
from mloc.spec.base import TIMEOUT_LABEL, field_of
from mloc.spec.loader import default_name
from mloc.spec.references import TRAINING
from mloc.state import TaskState
from mloc.store import TaskStore
from mloc.workers import WorkerRegistry

log = logging.getLogger(__name__)
MAX_BULK = 10_000
# An all-users usage report answers at most this many users, and stops adding users once it holds
# this many rows (a user is never cut in two); the answer names the user to continue after.
STATS_PAGE_USERS = 100
MAX_STATS_USERS = 1000
MAX_STATS_ROWS = 10_000


class Orchestrator:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.store = TaskStore(redis)
        self.registry = WorkerRegistry(redis)
        self.history = eta.DurationHistory(self.store)
        self.scheduler = Scheduler(
            self.store,
            self.registry,
            heartbeat_ttl_sec=settings.heartbeat_ttl_sec,
            limits=UserLimits(settings.user_max_tasks, settings.user_max_gpus),
            backfill_after_sec=settings.backfill_after_sec,
            history=self.history,
            fair_share_half_life_sec=settings.fair_share_half_life_sec,
        )
        self.overspend = Overspend(self.store, self.scheduler.standings)
        self.memfit = MemoryFit(redis, settings, self.scheduler)
        self.idempotency = Idempotency(redis, self.store, settings.idempotency_ttl_sec)
        # The orchestrator alone removes removed tasks' copies in the artifact store: one process, not
        # every worker racing for the same prefix.
        self.folders = FolderSweeper(redis, settings.results_dir, store=store_for(settings))
        self.backoff = Backoff(settings.retry_backoff_sec, settings.retry_backoff_max_sec)
        self.usage = UsageReports(redis)
        self._redis_trouble_at: float | None = None  # when the reaper last failed to reach Redis (monotonic)
        # This orchestrator's record among the others on this Redis (see start), renewed while it runs.
        self.presence = orchestrators.Presence.of(redis, settings)
        self.refusal: ConfigError | None = None  # why it may not run beside the orchestrators already there
        self._joining = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- membership
    async def start(self) -> None:
        """Join the orchestrators on this Redis before acting on anything they share: raises ConfigError
        where one that runs applies other fleet-wide settings (see :mod:`mloc.orchestrators`), after
        waiting out the record of one that may have crashed. Once joined, the record is renewed until
        :meth:`leave`. The server joins (:meth:`join`) before it listens, and the scheduler and reaper
        loops before they act; calling it again does nothing."""
        async with self._joining:
            if self.refusal is not None:
                raise self.refusal
            if self._keeper is not None:
                return
            try:
                await self.presence.admit()
            except ConfigError as exc:
                self.refusal = exc
                log.error("%s. This orchestrator does not start: its API, scheduler and reaper do not run", exc.message)
                raise
            self._keeper = asyncio.create_task(self.presence.keep(), name="presence")

    async def join(self) -> None:
        """:meth:`start`, tried again while Redis is unavailable: returns once joined, raises ConfigError
        when refused. The app's start-up awaits it, so no request is answered before."""
        while True:
            try:
                await self.start()
                return
            except aioredis.RedisError as exc:
                log.warning("orchestrator start: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def leave(self) -> None:
        """Stop renewing this orchestrator's record and delete it, so another may start with other
        settings at once; a record Redis cannot take now expires by itself. Submits' answers being
        kept for their Idempotency-Keys are kept first."""
        await self.idempotency.close()
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        await stopping.cancel(keeper)
        with contextlib.suppress(aioredis.RedisError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.presence.withdraw()

    async def _joined(self, stop: asyncio.Event) -> bool:
        """:meth:`start`, tried again while Redis is unavailable; False when refused or stopped first."""
        while not stop.is_set():
            try:
                await self.start()
                return True
            except ConfigError:
                return False
            except aioredis.RedisError as exc:
                log.warning("orchestrator start: Redis unavailable (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        return False

    # ------------------------------------------------------------------ submit
    def _owner(self, document: Document, principal: Principal) -> str:
        claimed = document.metadata.owner
        if principal.admin:
            return claimed or principal.name
        if claimed and claimed != principal.name:
            raise Forbidden(
                f"metadata.owner is {claimed!r} but your token belongs to {principal.name!r}; "
                "remove metadata.owner or set it to your user name"
            )
        return principal.name

    def _record(
        self,
        document: Document,
        principal: Principal,
        *,
        request: Request | None = None,
        wire: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> tuple[NewTask, Request]:
        """The task's new record and what it needs from a worker; ``request`` and ``wire`` are the
        document's, where the caller has worked them out already; ``task_id`` the id it was promised
        (an idempotent submit's), else a new one."""
        spec = document.spec
        request = request or request_of(document)
        retries = spec.retries if spec.retries is not None else self.settings.task_retries
        record = self.store.new_record(
            document=wire if wire is not None else document.to_wire(),
            name=default_name(document),
            owner=self._owner(document, principal),
            task_type=spec.task_type,
            kind=document.kind,
            topic=request.topic,
            priority=spec.priority,
            max_attempts=retries + 1,
            request=request.to_json(),
            labels=document.metadata.labels,
            task_id=task_id,
        )
        # The retry policy is fixed at submit, so every process that requeues the task applies the same one.
        backoff = spec.retry_backoff_sec if spec.retry_backoff_sec is not None else self.backoff.base_sec
        record.retry_backoff_sec = float(backoff)
        record.retry_backoff_max_sec = self.backoff.max_sec
        # The worker reads it: only the admin's tasks may read models from any local path.
        record.submitted_by = principal.name
        limit = self.settings.default_timeout(spec.task_type) if spec.timeout_sec is None else None
        if limit is not None:
            # The admin's limit, written into the task where the worker and the user read it.
            record.document["spec"]["timeout_sec"] = limit
            labels = record.document["metadata"].setdefault("labels", {})
            labels[TIMEOUT_LABEL] = f"MLOC_TASK_TIMEOUTS ({spec.task_type})"
            record.labels = labels
        return record, request

    async def _check_models(self, document: Document, principal: Principal) -> None:
        """Refuse a user's task that names local models outside the allowed folders, or another
        user's task as its adapter (see :mod:`mloc.modelroots`); the admin's tasks may name any. Any
        eval task naming harness tasks whose data no worker holds is refused too (:mod:`.harness`)."""
        if field_of(document.spec, "eval") is not None:
            harness.check(document, await self.scheduler.views())
        await self._check_adapter_task(document, principal)
        if principal.admin:
            return
        # Only the sections that can name a model: a bulk submit pays little for the check.
        spec = document.spec.model_dump(
            mode="json",
            by_alias=True,
            include={"model": True, "hyperparameters": True, "inference": {"input"}, "eval": {"custom"}},
        )
        roots = modelroots.ModelRoots.of(self.settings)
        refused = await modelroots.check_at_submit(self.redis, spec, principal.name, roots)
        if refused:
            raise Forbidden(refused)

    async def _check_adapter_task(self, document: Document, principal: Principal) -> None:
        """Refuse, for the admin too, a ``model.adapter.path`` naming a task that makes no adapter (it would
        fail on its worker), or a short id of one (the field takes a folder or a full id: the worker would
        look for a folder of that name)."""
        model = field_of(document.spec, "model")
        given = model.adapter.path if model is not None and model.adapter is not None else None
        if not given:
            return
        where = "spec.model.adapter.path"
        if modelroots.TASK_ID.match(given):
            task_type, owner, state = await self.redis.hmget(keys.task(given), "task_type", "owner", "state")
            if owner != principal.name and not principal.admin:
                return  # another user's task is refused as no task at all (mloc.modelroots): nothing is learnt
            if task_type is not None and task_type not in TRAINING:
                raise SpecError(
                    f"{where} names task {given}, of type {task_type}, which makes no adapter; name a "
                    f"{' or '.join(sorted(TRAINING))} task",
                    details=[{"path": where, "message": "not a training task"}],
                )
            if state in (TaskState.FAILED, TaskState.CANCELLED):
                # As model.adapter.from refuses it: the worker would find no adapter to load.
                raise SpecError(
                    f"{where} names task {given}, which {state}, so it has no adapter to load; resume it "
                    f"(`mloc resume {given[:8]}`) or name another {' or '.join(sorted(TRAINING))} task",
                    details=[{"path": where, "message": f"the task {state}"}],
                )
            if state is not None and state != TaskState.SUCCEEDED:
                raise SpecError(
                    f"{where} names task {given}, which is {state}: it has no adapter yet, and a path is not waited "
                    f"for; write model.adapter.from: {given} to run once it has succeeded",
                    details=[{"path": where, "message": f"the task is {state}"}],
                )
            return
        if not taskgraph.TASK_ID_OR_PREFIX.fullmatch(given):
            return
        found = await self.store.ids_starting_with(given, None if principal.admin else principal.name, most=1)
        if found:
            raise SpecError(
                f"{where} {given!r} is the start of task {found[0]}'s id, but the field takes a folder or a full "
                f"task id: give {found[0]}, or write model.adapter.from: {given}",
                details=[{"path": where, "message": "a short task id"}],
            )

    async def _check_quota(self, document: Document, principal: Principal) -> None:
        """Refuse a task asking for more GPUs than its owner's quota lets them hold at once: it would
        wait for ever (see :func:`.users.check_gpu_quota`). A task-count quota of 1 or more always
        lets one task start (0 is no limit), so only the GPU quota can refuse a task outright."""
        await users.check_gpu_quota(
            self.redis,
            self._owner(document, principal),
            document.spec.resources.hardware.gpu.count,
            default_gpus=self.settings.user_max_gpus,
        )

    async def _try_place(
        self,
        record: NewTask,
        request: Request,
        avoid: frozenset[str] = frozenset(),
        *,
        create: bool = False,
    ) -> Placement:
        return await self.scheduler.place(
            record.task_id,
            request,
            owner=record.owner,
            document=record.document,
            priority=record.priority,
            created_ms=record.created_ms,
            avoid=avoid,
            create=record if create else None,
        )

    async def _place(self, record: NewTask, request: Request, *, create: bool = False) -> dict[str, Any]:
        return _answer(record, await self._try_place(record, request, create=create))

    async def submit(self, document: Document, principal: Principal, *, task_id: str | None = None) -> dict[str, Any]:
        """Store and place one task; ``task_id``: the id to give it (see :mod:`.idempotency`)."""
        await self._check_models(document, principal)
        await self._check_quota(document, principal)
        request = request_of(document)
        fit = await self.memfit.assess(document, request)  # refuses what no GPU could hold
        wire = document.to_wire()
        if pipelines.waits(document, wire):
            ids = None if task_id is None else [task_id]
            return (await self.submit_graph([document], principal, ids=ids))["tasks"][0]
        if chunks.is_chunked(wire):
            return await self._submit_chunked(document, principal, fit, task_id)
        if document.spec.resources.replicas > 1:
            return await self._submit_group(document, principal, fit, task_id)
        record, request = self._record(document, principal, request=request, wire=wire, task_id=task_id)
        request = self.memfit.apply(record, fit)
        answer = await self._place(record, request, create=True)
        if log.isEnabledFor(logging.DEBUG):
            where = answer.get("worker_id") or f"pending: {answer.get('pending_reason')}"
            log.debug("task %s (%s) from %s -> %s", answer["task_id"], request.task_type, principal.name, where)
        return answer

    async def _submit_group(
        self, document: Document, principal: Principal, fit: Fit, task_id: str | None
    ) -> dict[str, Any]:
        parent, _ = self._record(document, principal, task_id=task_id)
        self.memfit.apply(parent, fit)
        children: list[tuple[NewTask, Request]] = []
        for shard in groups.shards(document, parent.name):
            shard["metadata"]["labels"][chunks.PARENT_LABEL] = parent.task_id
            record, request = self._record(validate(shard), principal)
            record.parent_id, record.replica = parent.task_id, len(children)
            # Each replica loads the whole model: the group's estimate is each one's, and so is what
            # admission asks of its GPU.
            record.memory_estimate = fit.memory_estimate
            if fit.request.gpu_mem != request.gpu_mem:
                request = replace(request, gpu_mem=fit.request.gpu_mem)
                record.request = request.to_json()
            children.append((record, request))
        parent.group_size = len(children)
        parent.children = [record.task_id for record, _ in children]
        parent.pending_reason = f"waiting for its {len(children)} replicas to start"
        answers = []
        used: set[str] = set()
        async with self.scheduler.paused():
            await self.store.insert([parent, *(record for record, _ in children)])
            # Spreading replicas over workers needs every worker that has joined, not a snapshot taken
            # before the newest registered.
            await self.scheduler.views(fresh=True)
            for record, request in children:
                placement = await self._try_place(record, request, frozenset(used))
                if placement.worker_id:
                    used.add(placement.worker_id)
                answers.append({"task_id": record.task_id, "worker_id": placement.worker_id})
        return {
            "ok": True,
            "task_id": parent.task_id,
            "worker_id": answers[0]["worker_id"],
            "topic": parent.topic,
            "state": "pending",
            "replicas": answers,
        }

    async def _submit_chunked(
        self, document: Document, principal: Principal, fit: Fit, task_id: str | None
    ) -> dict[str, Any]:
        parent, _ = self._record(document, principal, task_id=task_id)
        request = self.memfit.apply(parent, fit)  # its chunks, cut now or later, carry both
        children = chunks.first_chunks(parent)
        await self.store.insert([parent, *children])
        answers = []
        for record in children:
            placement = await self._try_place(record, request)
            answers.append({"task_id": record.task_id, "worker_id": placement.worker_id})
        return {
            "ok": True,
            "task_id": parent.task_id,
            "worker_id": answers[0]["worker_id"] if answers else None,
            "topic": parent.topic,
            "state": "pending",
            "chunks": answers,
        }

    async def submit_graph(
        self, documents: list[Document], principal: Principal, *, ids: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Tasks that wait for tasks (see :mod:`.pipelines`): planned whole, stored in one write, and
        those that wait for nothing placed at once. ``ids``: the id to give each document's task."""
        for document in documents:
            await self._check_models(document, principal)
            await self._check_quota(document, principal)
        fits = await self.memfit.assess_all(documents, [request_of(d) for d in documents])
        fit_of = {id(document): fit for document, fit in zip(documents, fits, strict=True)}
        id_of = dict(zip((id(document) for document in documents), ids or (), strict=False))

        def build(document: Document, principal: Principal) -> tuple[NewTask, Request]:
            record, _ = self._record(document, principal, task_id=id_of.get(id(document)))
            return record, self.memfit.apply(record, fit_of[id(document)])

        plan = await pipelines.plan(self.store, documents, principal, build)
        graphs = {plan.pipeline_id: plan.graph} if plan.pipeline_id and plan.graph else None
        await self.store.insert(plan.records(), pipelines=graphs)
        await pipelines.settle_ready(self.store, plan)
        placed = {record.task_id: await self._try_place(record, request) for record, request in plan.queued()}
        answers = []
        for step in plan.steps:
            first = step.chunks[0].task_id if step.chunks else step.task_id
            placement = placed.get(first)
            answers.append(
                {
                    "ok": True,
                    "task_id": step.task_id,
                    "name": step.name,
                    "worker_id": placement.worker_id if placement else None,
                    "topic": step.record.topic,
                    "state": "assigned" if placement and placement.worker_id else "pending",
                    "depends_on": step.depends_on,
                    "pending_reason": (placement.pending_reason if placement else step.record.pending_reason),
                    **({"pipeline_id": plan.pipeline_id} if plan.pipeline_id else {}),
                }
            )
        return {"ok": True, "pipeline_id": plan.pipeline_id, "count": len(answers), "tasks": answers}

    async def queue_estimate(self, record: TaskRecord) -> dict[str, Any] | None:
        """A placeable waiting task's queue position and start estimate (see :mod:`.eta`)."""
        if record.state != TaskState.PENDING or record.waiting_on or record.children or not record.request:
            return None
        # Fresh, as the tasks its workers hold are read next: a task placed since an older snapshot would
        # be counted twice, its resources free now and given back at its end.
        views = await self.scheduler.views(fresh=True)
        by_id = {view.worker_id: view for view in views}
        request = Request.from_json(record.request)
        backfill = self.scheduler.backfill
        hold = await backfill.bearing_on(record.task_id, request, by_id)
        found = await eta.estimate(
            self.store,
            self.history,
            views,
            record.task_id,
            record.request,
            hold,
            holdings_of=backfill.holdings,
            since=record.created_at,
            backfill_after=backfill.after_sec if backfill.after_sec > 0 else None,
            standing=backfill.hold,
            owner=record.owner,
            priority=record.priority,
            shares_of=functools.partial(eta.shares, self.redis, self.scheduler.standings),
        )
        return found.to_dict()

    async def queue_positions(self, task_ids: list[str]) -> list[int | None]:
        """1-based places in the pending order (None for a task not in it)."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.zrank(keys.PENDING, task_id)
        return [None if rank is None else rank + 1 for rank in await pipe.execute()]

    async def resume(self, task_id: str, principal: Principal) -> dict[str, Any]:
        """Run a failed or cancelled task again from where it stopped: a dataset task's unfinished
        chunks (see :mod:`.chunks`), a training task from its last checkpoint (see :mod:`.training`)."""
        await self._check_upload_kept(task_id)
        refused = await pipelines.resume_refusal(self.store, task_id)
        if refused:
            raise Conflict(refused)
        results_dir = self.settings.results_dir
        if await self.redis.hget(keys.task(task_id), "task_type") in TRAINING:
            answer = await training.resume(self.store, task_id, by=principal.name, results_dir=results_dir)
        else:
            answer = await chunks.resume(self.store, task_id, by=principal.name, results_dir=results_dir)
        answer["dependents_waiting"] = await pipelines.rearm_dependents(self.store, task_id, by=principal.name)
        return answer

    async def _check_upload_kept(self, task_id: str) -> None:
        """Refuse to resume a batch whose uploaded input file was deleted since it ended: its chunks
        would fail on the missing rows, and the lines the stopped chunk wrote would be lost with it."""
        labels = json.loads(await self.redis.hget(keys.task(task_id), "labels") or "{}")
        file_id = labels.get(INPUT_FILE_LABEL)
        if file_id and not await self.redis.exists(keys.openai_file(file_id)):
            raise Conflict(
                f"task {task_id} reads the uploaded file {file_id}, which has been deleted, so its unfinished "
                f"requests cannot run again; its finished lines stay (GET /api/v1/tasks/{task_id}/results, or the "
                "batch's output file): upload the file again and create a new batch for the rest"
            )

    async def submit_many(
        self, documents: list[Document], principal: Principal, *, ids: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Store and place many tasks; ``ids``: the id to give each (see :mod:`.idempotency`)."""
        _check_bulk_size(documents)
        given: list[str | None] = list(ids) if ids is not None else [None] * len(documents)
        for document in documents:
            await self._check_models(document, principal)  # all or nothing: before any is stored
            await self._check_quota(document, principal)
        # Each document's wire form and request, worked out once: the checks below and its record all use them.
        wires = [document.to_wire() for document in documents]
        if pipelines.needs_planning(documents, wires):
            return list((await self.submit_graph(documents, principal, ids=ids))["tasks"])
        if any(d.spec.resources.replicas > 1 or chunks.is_chunked(w) for d, w in zip(documents, wires, strict=True)):
            return [
                await self.submit(document, principal, task_id=task_id)
                for document, task_id in zip(documents, given, strict=True)
            ]
        requests = [request_of(d) for d in documents]
        fits = await self.memfit.assess_all(documents, requests)
        prepared = [
            self._record(doc, principal, request=req, wire=wire, task_id=tid)
            for doc, req, wire, tid in zip(documents, requests, wires, given, strict=True)
        ]
        prepared = [(record, self.memfit.apply(record, fit)) for (record, _), fit in zip(prepared, fits, strict=True)]
        # Workers are chosen on one snapshot before anything is stored, so the tasks that must wait
        # are stored with their reason; the placements are then made together (Scheduler.commit).
        scheduler = self.scheduler
        # A fresh snapshot: one kept from a moment ago misses the room freed since, and the whole bulk
        # would wait for the next pass, told that no worker has room.
        views = await scheduler.views(fresh=True)
        decisions: list[Decision] = []
        # Capacity only shrinks during this loop, so once a request found no worker, later identical
        # requests would not either: they wait with the first one's reason.
        no_room: dict[Request, Placement] = {}
        answers: list[Placement | int] = []
        for record, request in prepared:
            # An owner's exhausted budget keeps the task waiting, whatever room there is.
            budget = await scheduler.standings.holding(record.owner, request)
            if budget is not None:
                record.pending_code = WaitCode.BUDGET.value  # the autoscalers' demand leaves it out
            waiting = no_room.get(request) if budget is None else Placement(worker_id=None, pending_reason=budget)
            choice = None if waiting is not None else scheduler.choose(request, views)
            if choice is not None:
                answers.append(len(decisions))
                decision = Decision(
                    record.task_id,
                    request,
                    record.owner,
                    record.priority,
                    record.created_ms,
                    choice[0],
                    choice[1],
                    document=record.document,
                )
                decisions.append(decision)
                continue
            if waiting is None:
                reason, never = explain(request, views)
                waiting = Placement(worker_id=None, pending_reason=reason, unschedulable=never)
                if not never:
                    no_room[request] = waiting
            record.pending_reason, record.unschedulable = waiting.pending_reason or "", waiting.unschedulable
            answers.append(waiting)
        await self.store.insert([record for record, _ in prepared])
        placed = await scheduler.commit(decisions)
        return [
            _answer(record, answer if isinstance(answer, Placement) else placed[answer])
            for (record, _), answer in zip(prepared, answers, strict=True)
        ]

    async def dry_run(
        self,
        document: Document,
        principal: Principal,
        views: list[WorkerView] | None = None,
        *,
        planned: bool = False,
    ) -> dict[str, Any]:
        """Validate and say where the task would go, without storing anything (``views``: the
        registry snapshot to judge by, else a fresh one; ``planned``: the tasks it names were
        checked already, with the rest of its submission)."""
        request = request_of(document)
        self._owner(document, principal)
        await self._check_models(document, principal)
        await self._check_quota(document, principal)
        if not planned and pipelines.waits(document):  # what it names is checked as its submit checks it
            await pipelines.plan(self.store, [document], principal, self._record)
        views = views if views is not None else await self.scheduler.views(fresh=True)
        fit = await self.memfit.assess(document, request)
        request = fit.request
        fits = [v.worker_id for v in views if misfit(request, v) is None]
        answer: dict[str, Any] = {
            "ok": True,
            "valid": True,
            "task": document.to_wire(),
            "topic": request.topic,
            "would_place_on": fits[:10],
            "memory_estimate": fit.memory_estimate,
        }
        if not fits:
            answer["pending_reason"], answer["unschedulable"] = explain(request, views)
        return answer

    async def dry_run_many(self, documents: list[Document], principal: Principal) -> list[dict[str, Any]]:
        """:meth:`dry_run` for a bulk submit: each task judged on one snapshot, and tasks that wait for
        tasks planned as their submit would plan them (names, references, cycles), storing nothing."""
        _check_bulk_size(documents)
        if pipelines.needs_planning(documents):
            await pipelines.plan(self.store, documents, principal, self._record)
        views = await self.scheduler.views(fresh=True)
        return [await self.dry_run(document, principal, views, planned=True) for document in documents]

    # ------------------------------------------------------------- background
    async def cleanup(self) -> reaper.ReapReport:
        """One reaper round: hand back lost workers' tasks, forget tasks past their retention, and
        settle every open replica group (in case a wake-up was missed)."""
        if self.refusal is not None:
            raise self.refusal  # its retention and TTL are not the fleet's
        trouble = self._redis_trouble_at
        report = await reaper.reap(
            self.store,
            self.registry,
            ttl_sec=self.settings.heartbeat_ttl_sec,
            backoff=self.backoff,
            max_requeues=self.settings.max_requeues,
            redis_calm_sec=await reaper.redis_calm_sec(
                self.store, None if trouble is None else time.monotonic() - trouble
            ),
        )
        if self.settings.task_retention_sec > 0:
            forgotten = await reaper.forget_finished(self.store, older_than_sec=self.settings.task_retention_sec)
            report.forgotten = len(forgotten)
        await self.folders.sweep()  # those of tasks any orchestrator removed, in this one's RESULTS_DIR
        await groups.sweep(self.store, self.settings.results_dir, self.settings)
        await pipelines.sweep(self.store)
        if report.requeued:
            await self.scheduler.schedule_pending()
        return report

    async def run_scheduler(self, stop: asyncio.Event) -> None:
        """Place waiting tasks whenever capacity frees (pub/sub wake-ups) and at a steady interval,
        once this orchestrator has joined the others (:meth:`start`)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            if not await self._joined(stop):
                return
            await pubsub.subscribe(keys.SCHEDULER_WAKE)
            woken = announced = False
            while not stop.is_set():
                try:
                    if not announced:
                        # Every process that ends a task decays fair-share usage with this half-life: every
                        # orchestrator running has the same (start refused any other).
                        half_life = repr(self.settings.fair_share_half_life_sec)
                        await self.redis.set(keys.FAIR_SHARE_HALF_LIFE, half_life)
                        announced = True
                    # A wake-up (capacity freed) needs a pass sized to that capacity; the steady
                    # interval's full pass also refreshes every waiting task's reason.
                    await self.scheduler.schedule_pending(quick=woken)
                    # Replica groups whose shards started or ended woke this pass too.
                    await groups.settle_marked(self.store, self.settings.results_dir, settings=self.settings)
                    await pipelines.release_marked(self.store)
                    # A finished task that took its owner over a hard budget stops the rest.
                    await self.overspend.stop()
                    woken = False
                    deadline = time.monotonic() + self.settings.schedule_interval_sec
                    if self.scheduler.queues.next_retry_at is not None:
                        # A retry waiting out its backoff is due before the next regular pass.
                        due = time.monotonic() + max(0.0, self.scheduler.queues.next_retry_at - time.time())
                        deadline = min(deadline, due)
                    while not stop.is_set() and time.monotonic() < deadline:
                        message = await pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                        if message is not None:
                            # Coalesce a burst of wake-ups into one pass.
                            while await pubsub.get_message(timeout=0) is not None:
                                pass
                            woken = True
                            break
                except aioredis.RedisError as exc:
                    # Down, or refusing writes (out of memory, read-only replica): the loop must outlive it.
                    log.warning("scheduler: Redis unavailable (%s); retrying", exc)
                    await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            await self.leave()

    async def run_reaper(self, stop: asyncio.Event) -> None:
        """A reaper round (:meth:`cleanup`) every reap interval, once this orchestrator has joined the others."""
        try:
            if not await self._joined(stop):
                return
            while not stop.is_set():
                try:
                    await self.cleanup()
                except aioredis.RedisError as exc:
                    # Heartbeats could not land meanwhile either: silences are counted from its return.
                    self._redis_trouble_at = time.monotonic()
                    log.warning("reaper: Redis unavailable (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.settings.reap_every_sec)
        finally:
            await self.leave()

    # ------------------------------------------------------------------ stats
    async def stats(
        self,
        user: str | None,
        start: date | None,
        end: date | None,
        *,
        group_by: Grouping = Grouping.DAY,
        after: str | None = None,
        limit: int = STATS_PAGE_USERS,
        max_rows: int = MAX_STATS_ROWS,
        today: date | None = None,
    ) -> dict[str, Any]:
        """Usage of one user, or of every user a page at a time (``after``: the last user of the
        previous page; a page ends early past ``max_rows`` rows), over any range of UTC days.
        ``today`` (UTC) is the clock's unless given: it says which days may still change."""
        today = today or datetime.now(UTC).date()
        end = end or today
        start = start or end - timedelta(days=29)
        if start > end:
            raise BadRequest(f"start_date {start} is after end_date {end}; swap them")
        if not 1 <= limit <= MAX_STATS_USERS:
            raise BadRequest(f"limit is {limit}; give 1 to {MAX_STATS_USERS} users per page")
        if user:
            users, more = [user], False
        else:
            everyone = sorted(await self.redis.smembers(keys.USAGE_OWNERS))
            offset = bisect.bisect_right(everyone, after) if after else 0
            users, more = everyone[offset : offset + limit], offset + limit < len(everyone)
        kept: list[dict[str, Any]] = []
        rows = 0
        for entry in await self.usage.report(users, start, end, today=today, grouping=group_by):
            size = len(entry.get("days") or entry.get("periods") or ())
            if kept and rows + size > max_rows:
                more = True
                break
            kept.append(entry)
            rows += size
        standings = await self.scheduler.standings.read([entry["user"] for entry in kept])
        for entry in kept:
            if spent := standings[entry["user"]].budgets:
                # Spend against each budget in its current day or month, whatever range the report covers.
                entry["budgets"] = [standing.to_dict() for standing in spent]
        return {
            "ok": True,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
            "group_by": group_by.value,
            "users": kept,
            # When users were left out: the next page starts after ``next_after``.
            "truncated": more,
            "next_after": kept[-1]["user"] if more and kept else None,
        }

    # ---------------------------------------------------------------- workers
    async def workers_seen_by(self, principal: Principal, records: list[WorkerRecord]) -> list[dict[str, Any]]:
        """Worker records as ``principal`` may see them: a user sees the ids of their own tasks only,
        and in ``hidden_tasks`` how many other tasks the worker holds (the admin sees every id)."""
        items = [record.model_dump(mode="json") for record in records]
        ours = self.settings.artifact_store_url or ""
        for item in items:
            # How long a silence makes it lost (its tasks requeued): what a client needs to read its heartbeat's age.
            item["lost_after_sec"] = self.settings.heartbeat_ttl_sec
            theirs = item.get("artifact_store")
            if theirs is not None and theirs.rstrip("/") != ours.rstrip("/"):
                item["warning"] = store_mismatch(theirs, ours)
        if principal.admin:
            for item in items:
                item["hidden_tasks"] = 0
            return items
        ids = sorted({task_id for item in items for task_id in item["tasks"]})
        owners: dict[str, str | None] = {}
        if ids:
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hget(keys.task(task_id), "owner")
            owners = dict(zip(ids, await pipe.execute(), strict=True))
        for item in items:
            mine = [task_id for task_id in item["tasks"] if owners.get(task_id) == principal.name]
            item["hidden_tasks"] = len(item["tasks"]) - len(mine)
            item["tasks"] = mine
        return items

    def check_stats_access(self, principal: Principal, user: str | None) -> str | None:
        if principal.admin:
            return user
        if user and user != principal.name:
            raise Forbidden(f"you may read only your own usage ({principal.name!r})")
        return principal.name


def _check_bulk_size(documents: list[Document]) -> None:
    if len(documents) > MAX_BULK:
        raise BadRequest(f"{len(documents)} tasks in one request; the limit is {MAX_BULK}")


def _answer(record: NewTask, placement: Placement) -> dict[str, Any]:
    """A submit's answer, in seed 1's shape: ok, task_id, worker_id, topic (and why it waits)."""
    answer: dict[str, Any] = {
        "ok": True,
        "task_id": record.task_id,
        "worker_id": placement.worker_id,
        "topic": record.topic,
        "state": "assigned" if placement.worker_id else "pending",
    }
    if placement.pending_reason:
        answer["pending_reason"] = placement.pending_reason
        answer["unschedulable"] = placement.unschedulable
    if record.memory_estimate and record.memory_estimate.get("warning"):
        answer["memory_warning"] = record.memory_estimate["warning"]
    return answer


def store_mismatch(theirs: str, ours: str) -> str:
    """Why a worker's results may not reach this orchestrator: they publish to different stores."""
    published = f"publishes results to {theirs}" if theirs else "publishes no results (no MLOC_ARTIFACT_STORE)"
    read = f"this orchestrator reads {ours}" if ours else "this orchestrator reads only its own RESULTS_DIR"
    return (
        f"it {published}, but {read}: its tasks' files are served only if the two share a disk; "
        "set the same MLOC_ARTIFACT_STORE on every worker and the orchestrator"
    )
