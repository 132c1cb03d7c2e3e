"""The orchestrator's operations, independent of HTTP: submit, dry-run, cancel, cleanup, stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from mloc import groups, keys, lifecycle
from mloc.errors import BadRequest, Forbidden, SpecError
from mloc.registry import WorkerRegistry
from mloc.scheduler import Placement, Request, Scheduler, explain, misfit, request_of
from mloc.settings import Settings
from mloc.spec import Document, validate
from mloc.spec.loader import default_name
from mloc.store import TaskStore
from mloc.usage import UsageReports
from mloc.users import Principal

log = logging.getLogger(__name__)
MAX_BULK = 10_000
MAX_STATS_DAYS = 366


class Orchestrator:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.store = TaskStore(redis)
        self.registry = WorkerRegistry(redis)
        self.scheduler = Scheduler(
            self.store,
            self.registry,
            heartbeat_ttl_sec=settings.heartbeat_ttl_sec,
            user_max_tasks=settings.user_max_tasks,
            user_max_gpus=settings.user_max_gpus,
        )
        self.backoff = lifecycle.Backoff(settings.retry_backoff_sec, settings.retry_backoff_max_sec)
        self.usage = UsageReports(redis)

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

    def _record(self, document: Document, principal: Principal) -> tuple[dict[str, str], Request]:
        spec = document.spec
        request = request_of(document)
        retries = spec.retries if spec.retries is not None else self.settings.task_retries
        record = self.store.new_record(
            document=document.to_wire(),
            name=default_name(document),
            owner=self._owner(document, principal),
            task_type=spec.task_type,
            kind=document.kind,
            topic=request.topic,
            priority=spec.priority,
            max_attempts=retries + 1,
            request=request.to_json(),
            labels=document.metadata.labels,
        )
        # The retry policy is fixed at submit, so every process that requeues the task applies the same one.
        backoff = spec.retry_backoff_sec if spec.retry_backoff_sec is not None else self.backoff.base_sec
        record["retry_backoff_sec"] = repr(float(backoff))
        record["retry_backoff_max_sec"] = repr(self.backoff.max_sec)
        return record, request

    async def _try_place(
        self,
        record: dict[str, str],
        request: Request,
        avoid: frozenset[str] = frozenset(),
        *,
        create: bool = False,
    ) -> Placement:
        return await self.scheduler.place(
            record["id"],
            request,
            owner=record["owner"],
            document=record["spec"],
            priority=int(record["priority"]),
            created_ms=int(record["created_ms"]),
            avoid=avoid,
            create=record if create else None,
        )

    async def _place(self, record: dict[str, str], request: Request, *, create: bool = False) -> dict[str, Any]:
        return _answer(record, await self._try_place(record, request, create=create))

    async def submit(self, document: Document, principal: Principal) -> dict[str, Any]:
        if document.spec.resources.replicas > 1:
            return await self._submit_group(document, principal)
        record, request = self._record(document, principal)
        return await self._place(record, request, create=True)

    async def _submit_group(self, document: Document, principal: Principal) -> dict[str, Any]:
        if document.spec.task_type != "inference":
            raise SpecError(
                f"resources.replicas > 1 is supported for inference tasks, not {document.spec.task_type!r}; "
                "submit one task per replica",
                details=[{"path": "spec.resources.replicas", "message": "must be 1 for this task type", "fix": "1"}],
            )
        parent, _ = self._record(document, principal)
        children: list[tuple[dict[str, str], Request]] = []
        for shard in groups.shards(document, parent["name"]):
            shard["metadata"]["labels"][groups.PARENT_LABEL] = parent["id"]
            record, request = self._record(validate(shard), principal)
            record.update({"parent_id": parent["id"], "replica": str(len(children))})
            children.append((record, request))
        parent.update(
            {
                "group_size": str(len(children)),
                "children": json.dumps([record["id"] for record, _ in children]),
                "pending_reason": f"waiting for its {len(children)} replicas to start",
            }
        )
        await self.store.insert([parent, *(record for record, _ in children)])
        answers = []
        used: set[str] = set()
        for record, request in children:
            placement = await self._try_place(record, request, frozenset(used))
            if placement.worker_id:
                used.add(placement.worker_id)
            answers.append({"task_id": record["id"], "worker_id": placement.worker_id})
        return {
            "ok": True,
            "task_id": parent["id"],
            "worker_id": answers[0]["worker_id"],
            "topic": parent["topic"],
            "state": "pending",
            "replicas": answers,
        }

    async def submit_many(self, documents: list[Document], principal: Principal) -> list[dict[str, Any]]:
        if len(documents) > MAX_BULK:
            raise BadRequest(f"{len(documents)} tasks in one request; the limit is {MAX_BULK}")
        if any(document.spec.resources.replicas > 1 for document in documents):
            return [await self.submit(document, principal) for document in documents]
        prepared = [self._record(document, principal) for document in documents]
        await self.store.insert([record for record, _ in prepared])
        answers = []
        # Capacity only shrinks during this loop, so once a request found no worker, later identical
        # requests would not either: they stay pending for the scheduler without trying each one.
        no_room: dict[str, Placement] = {}
        for record, request in prepared:
            placement = no_room.get(record["req"])
            if placement is None:
                placement = await self._try_place(record, request)
                if placement.worker_id is None and not placement.unschedulable:
                    no_room[record["req"]] = placement
            answers.append(_answer(record, placement))
        return answers

    async def dry_run(self, document: Document, principal: Principal) -> dict[str, Any]:
        """Validate and say where the task would go, without storing anything."""
        request = request_of(document)
        self._owner(document, principal)
        views = await self.scheduler.views(fresh=True)
        fits = [v.worker_id for v in views if misfit(request, v) is None]
        answer: dict[str, Any] = {
            "ok": True,
            "valid": True,
            "task": document.to_wire(),
            "topic": request.topic,
            "would_place_on": fits[:10],
        }
        if not fits:
            answer["pending_reason"], answer["unschedulable"] = explain(request, views)
        return answer

    # ------------------------------------------------------------- background
    async def cleanup(self) -> lifecycle.ReapReport:
        report = await lifecycle.reap(
            self.store, self.registry, ttl_sec=self.settings.heartbeat_ttl_sec, backoff=self.backoff
        )
        if self.settings.task_retention_sec > 0:
            forgotten = await lifecycle.forget_finished(self.store, older_than_sec=self.settings.task_retention_sec)
            report.forgotten = len(forgotten)
        for task_id in report.failed:
            parent = await self.redis.hget(keys.task(task_id), "parent_id")
            if parent:  # a shard out of retries fails its replica group
                await groups.shard_finished(self.store, parent, self.settings.results_dir)
        if report.requeued:
            await self.scheduler.schedule_pending()
        return report

    async def run_scheduler(self, stop: asyncio.Event) -> None:
        """Place waiting tasks whenever capacity frees (pub/sub wake-ups) and at a steady interval."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(keys.SCHEDULER_WAKE)
        try:
            woken = False
            while not stop.is_set():
                try:
                    # A wake-up (capacity freed) needs a pass sized to that capacity; the steady
                    # interval's full pass also refreshes every waiting task's reason.
                    await self.scheduler.schedule_pending(quick=woken)
                    woken = False
                    deadline = time.monotonic() + self.settings.schedule_interval_sec
                    if self.scheduler.next_retry_at is not None:
                        # A retry waiting out its backoff is due before the next regular pass.
                        due = time.monotonic() + max(0.0, self.scheduler.next_retry_at - time.time())
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

    async def run_reaper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.cleanup()
            except aioredis.RedisError as exc:
                log.warning("reaper: Redis unavailable (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.reap_every_sec)

    # ------------------------------------------------------------------ stats
    async def stats(self, user: str | None, start: date | None, end: date | None) -> dict[str, Any]:
        end = end or date.today()
        start = start or end - timedelta(days=29)
        if start > end:
            raise BadRequest(f"start_date {start} is after end_date {end}; swap them")
        if (end - start).days >= MAX_STATS_DAYS:
            raise BadRequest(f"the range covers more than {MAX_STATS_DAYS} days; narrow it")
        users = [user] if user else sorted(await self.redis.smembers(keys.USAGE_OWNERS))
        per_user = await self.usage.report(users, start, end, today=datetime.now(UTC).date())
        return {"ok": True, "start_date": start.isoformat(), "end_date": end.isoformat(), "users": per_user}

    def check_stats_access(self, principal: Principal, user: str | None) -> str | None:
        if principal.admin:
            return user
        if user and user != principal.name:
            raise Forbidden(f"you may read only your own usage ({principal.name!r})")
        return principal.name


def _answer(record: dict[str, str], placement: Placement) -> dict[str, Any]:
    """A submit's answer, in seed 1's shape: ok, task_id, worker_id, topic (and why it waits)."""
    answer: dict[str, Any] = {
        "ok": True,
        "task_id": record["id"],
        "worker_id": placement.worker_id,
        "topic": record["topic"],
        "state": "assigned" if placement.worker_id else "pending",
    }
    if placement.pending_reason:
        answer["pending_reason"] = placement.pending_reason
        answer["unschedulable"] = placement.unschedulable
    return answer
