"""Task records in Redis and the one function that changes a task's state."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, lua
from mloc.errors import InvalidTransition, NotFound
from mloc.records import TaskRecord
from mloc.state import TaskState, sources_of

# A result larger than this is kept whole in Redis but summarised on the task record.
SUMMARY_LIMIT = 16 * 1024
# Placement order: priority dominates, then submission time (FIFO within a priority).
_PRIORITY_WEIGHT = 10**13


def pending_score(priority: int, created_ms: int) -> float:
    return float(-priority * _PRIORITY_WEIGHT + created_ms)


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Reservation:
    worker_id: str
    cpu: int
    mem: int
    gpus: list[int]
    message: str


@dataclass(frozen=True)
class Transition:
    ok: bool
    previous: str | None = None
    attempt: int = 0
    state: TaskState | None = None  # the state entered (a requeue past the limit becomes failed)
    error: str | None = None  # missing | state | fenced | capacity
    detail: str = ""


def summarise(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a result kept on the task record: everything if small, else the scalar fields."""
    text = json.dumps(result, default=str)
    if len(text) <= SUMMARY_LIMIT:
        return dict(result)
    summary: dict[str, Any] = {
        k: v for k, v in result.items() if isinstance(v, str | int | float | bool) or k == "usage"
    }
    summary["truncated"] = True
    summary["full_result_bytes"] = len(text)
    return summary


class TaskStore:
    """Reads and writes task records; every state change goes through :meth:`transition`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._transition = redis.register_script(lua.TRANSITION)
        self._create = redis.register_script(lua.CREATE)

    # ----------------------------------------------------------------- create
    def new_record(
        self,
        *,
        document: dict[str, Any],
        name: str,
        owner: str,
        task_type: str,
        kind: str,
        topic: str,
        priority: int,
        max_attempts: int,
        request: dict[str, Any],
        labels: Mapping[str, str],
        now: float | None = None,
    ) -> dict[str, str]:
        now = time.time() if now is None else now
        return {
            "id": str(uuid.uuid4()),
            "name": name,
            "owner": owner,
            "task_type": task_type,
            "kind": kind,
            "topic": topic,
            "priority": str(priority),
            "state": TaskState.PENDING.value,
            "attempts": "0",
            "max_attempts": str(max_attempts),
            "created_at": repr(now),
            "created_ms": str(int(now * 1000)),
            "updated_at": repr(now),
            "spec": json.dumps(document, separators=(",", ":")),
            "req": json.dumps(request, separators=(",", ":")),
            "labels": json.dumps(dict(labels), separators=(",", ":")),
            "pending_reason": "waiting for the scheduler",
        }

    def _create_call(self, rec: dict[str, str]) -> tuple[list[str], list[str]]:
        created_ms = int(rec["created_ms"])
        fields = [item for pair in rec.items() for item in pair]
        return (
            [
                keys.task(rec["id"]),
                keys.TASKS_ALL,
                keys.tasks_in_state(TaskState.PENDING),
                keys.tasks_of_owner(rec["owner"]),
                keys.PENDING,
            ],
            [
                rec["id"],
                str(created_ms),
                "" if rec.get("group_size") else repr(pending_score(int(rec["priority"]), created_ms)),
                *fields,
            ],
        )

    async def insert(self, records: list[dict[str, str]]) -> None:
        """Store new pending tasks atomically: all or none, in one round trip."""
        if len(records) == 1:
            task_keys, args = self._create_call(records[0])
            await self._create(keys=task_keys, args=args)
            return
        pipe = self.redis.pipeline(transaction=True)
        for rec in records:
            task_keys, args = self._create_call(rec)
            await self._create(keys=task_keys, args=args, client=pipe)
        await pipe.execute()

    # ------------------------------------------------------------- transition
    async def transition(
        self,
        task_id: str,
        target: TaskState,
        *,
        sources: Iterable[TaskState] | None = None,
        expect_worker: str | None = None,
        expect_attempt: int | None = None,
        fields: Mapping[str, str] | None = None,
        release: bool = False,
        reserve: Reservation | None = None,
        new_attempt: bool = False,
        fail_when_attempts_used: bool = False,
        result: Mapping[str, Any] | None = None,
        usage: Mapping[str, float] | None = None,
        owner: str | None = None,
        ack: str | None = None,
        priority: int = 0,
        created_ms: int = 0,
        now: float | None = None,
    ) -> Transition:
        """Move a task to ``target`` if it is in one of ``sources`` (default: every state the table
        allows). Capacity release and reservation, the worker's stream message, the result, usage
        and the acknowledgement of the stream entry ``ack`` are written in the same atomic step, so a
        task completes once even if delivered twice."""
        now = time.time() if now is None else now
        allowed = sorted(set(sources) if sources is not None else sources_of(target))
        if not allowed:
            raise InvalidTransition(f"no state may move to {target}")
        extra = dict(fields or {})
        if result is not None:
            extra["result_summary"] = json.dumps(summarise(result), default=str)
        usage_key = keys.usage_day(owner, utc_day(now)) if usage and owner else keys.usage_day("-", "-")
        reserve_json = ""
        if reserve is not None:
            reserve_json = json.dumps(
                {
                    "worker": reserve.worker_id,
                    "cpu": reserve.cpu,
                    "mem": reserve.mem,
                    "gpus": reserve.gpus,
                    "message": reserve.message,
                },
                separators=(",", ":"),
            )
        reply = await self._transition(
            keys=[
                keys.task(task_id),
                keys.PENDING,
                keys.EVENTS,
                keys.task_result(task_id),
                usage_key,
                keys.USAGE_OWNERS,
            ],
            args=[
                target.value,
                ",".join(s.value for s in allowed),
                repr(now),
                expect_worker or "",
                "" if expect_attempt is None else str(expect_attempt),
                json.dumps(extra, separators=(",", ":")) if extra else "",
                "1" if release else "",
                reserve_json,
                repr(pending_score(priority, created_ms)) if target == TaskState.PENDING else "",
                "1" if new_attempt else "",
                json.dumps(result, default=str, separators=(",", ":")) if result is not None else "",
                json.dumps(dict(usage), separators=(",", ":")) if usage else "",
                keys.worker("{id}"),
                keys.worker_free_gpus("{id}"),
                keys.worker_tasks("{id}"),
                keys.worker_stream("{id}"),
                keys.tasks_in_state("{id}"),
                keys.SCHEDULER_WAKE,
                "1" if fail_when_attempts_used else "",
                task_id,
                owner or "",
                ack or "",
                keys.WORKER_GROUP,
            ],
        )
        status, a, b, *rest = [x.decode() if isinstance(x, bytes) else x for x in reply]
        if status == "ok":
            return Transition(True, previous=a, attempt=int(b), state=TaskState(rest[0]))
        return Transition(False, error=a, detail=b)

    # ------------------------------------------------------------------ reads
    async def get_hash(self, task_id: str) -> dict[str, str]:
        return await self.redis.hgetall(keys.task(task_id))

    async def get(self, task_id: str, *, with_spec: bool = True) -> TaskRecord:
        h = await self.get_hash(task_id)
        if not h:
            raise NotFound(f"task {task_id} not found; list tasks with GET /api/v1/tasks")
        return TaskRecord.from_hash(h, with_spec=with_spec)

    async def get_many(self, task_ids: list[str], *, with_spec: bool = False) -> list[TaskRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(keys.task(task_id))
        return [TaskRecord.from_hash(h, with_spec=with_spec) for h in await pipe.execute() if h]

    async def page(
        self,
        *,
        page: int,
        page_size: int,
        state: TaskState | None = None,
        owner: str | None = None,
        task_type: str | None = None,
    ) -> tuple[list[TaskRecord], int]:
        """Newest first. Filters by state and owner use their indexes; task_type filters a page."""
        if (owner and state) or owner:
            index = keys.tasks_of_owner(owner)
        elif state:
            index = keys.tasks_in_state(state)
        else:
            index = keys.TASKS_ALL
        start = (page - 1) * page_size
        if (owner and state) or task_type:
            # No combined index: walk the narrower one and filter, in bounded batches.
            matches: list[TaskRecord] = []
            total = 0
            cursor = 0
            batch = 500
            while True:
                ids = await self.redis.zrevrange(index, cursor, cursor + batch - 1)
                if not ids:
                    break
                cursor += batch
                for rec in await self.get_many(ids):
                    if (state and rec.state != state) or (task_type and rec.task_type != task_type):
                        continue
                    if start <= total < start + page_size:
                        matches.append(rec)
                    total += 1
            return matches, total
        total = await self.redis.zcard(index)
        ids = await self.redis.zrevrange(index, start, start + page_size - 1)
        return await self.get_many(ids), total

    async def result(self, task_id: str) -> Any:
        raw = await self.redis.get(keys.task_result(task_id))
        return json.loads(raw) if raw else None

    async def set_fields(self, task_id: str, fields: Mapping[str, str]) -> None:
        """Write informational fields (progress, pending reason) that are not state."""
        await self.redis.hset(keys.task(task_id), mapping=dict(fields))

    async def pending_ids(self, limit: int) -> list[str]:
        return await self.redis.zrange(keys.PENDING, 0, limit - 1)

    async def counts_by_state(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for state in TaskState:
            pipe.zcard(keys.tasks_in_state(state))
        return {state.value: n for state, n in zip(TaskState, await pipe.execute(), strict=True)}


def require(transition: Transition, task_id: str, target: TaskState) -> Transition:
    """Turn a refused transition into the error a person sees."""
    if transition.ok:
        return transition
    if transition.error == "missing":
        raise NotFound(f"task {task_id} not found")
    if transition.error == "state":
        raise InvalidTransition(f"task {task_id} is {transition.detail}; it cannot become {target}")
    raise InvalidTransition(f"task {task_id} could not become {target}: {transition.error} {transition.detail}")
