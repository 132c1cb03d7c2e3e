"""Task records in Redis and the one function that changes a task's state."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
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


def _json(value: Any) -> str:
    """Compact JSON for stored fields and script arguments (orjson: several times faster than json)."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def day_number(ts: float) -> int:
    """The UTC day of ``ts`` as days since 1970-01-01: the score of the usage day indexes."""
    return math.floor(ts / 86_400)


@dataclass(frozen=True)
class Reservation:
    worker_id: str
    cpu: int
    mem: int
    gpus: list[int]
    message: str
    user: str = ""  # the task's owner: the reservation counts against their quota
    max_tasks: int = 0  # limits for a user without their own quota (0 = unlimited)
    max_gpus: int = 0


@dataclass(frozen=True)
class Transition:
    ok: bool
    previous: str | None = None
    attempt: int = 0
    state: TaskState | None = None  # the state entered (a requeue past the limit becomes failed)
    error: str | None = None  # missing | state | fenced | capacity | quota | backoff
    detail: str = ""


@dataclass(frozen=True)
class Move:
    """One requested state change of a task: the arguments of :meth:`TaskStore.transition`."""

    target: TaskState
    sources: Iterable[TaskState] | None = None
    expect_worker: str | None = None
    expect_attempt: int | None = None
    fields: Mapping[str, str] | None = None
    release: bool = False
    reserve: Reservation | None = None
    new_attempt: bool = False
    fail_when_attempts_used: bool = False
    result: Mapping[str, Any] | None = None
    usage: Mapping[str, float] | None = None
    owner: str | None = None
    ack: str | None = None
    priority: int = 0
    created_ms: int = 0
    now: float | None = None
    retry_at: float | None = None


def _outcome(reply: list[Any]) -> Transition:
    status, a, b, *rest = [x.decode() if isinstance(x, bytes) else x for x in reply]
    if status == "ok":
        return Transition(True, previous=a, attempt=int(b), state=TaskState(rest[0]))
    return Transition(False, error=a, detail=b)


def record_of(h: dict[str, str], *, with_spec: bool) -> TaskRecord:
    """A stored task as the API shows it; a retry waiting out its backoff says how long is left."""
    record = TaskRecord.from_hash(h, with_spec=with_spec)
    retry_at = h.get("retry_at")
    if retry_at and record.state == TaskState.PENDING and float(retry_at) > time.time():
        left = math.ceil(float(retry_at) - time.time())
        record.pending_reason = f"{record.pending_reason or 'retry'}; eligible in {left}s"
    return record


def summarise(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a result kept on the task record: everything if small, else the scalar fields."""
    text = _json(result)
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
        self._read_hashes = redis.register_script(lua.READ_HASHES)
        self._submit = redis.register_script(lua.SUBMIT)
        self._twice = redis.register_script(lua.TRANSITION_TWICE)

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
            "spec": _json(document),
            "req": _json(request),
            "labels": _json(dict(labels)),
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
                keys.pending_of(rec["owner"]),
                keys.PENDING_OWNERS,
            ],
            [
                rec["id"],
                str(created_ms),
                "" if rec.get("group_size") else repr(pending_score(int(rec["priority"]), created_ms)),
                rec["owner"],
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
        retry_at: float | None = None,
        create: dict[str, str] | None = None,
        then: Move | None = None,
    ) -> Transition:
        """Move a task to ``target`` if it is in one of ``sources`` (default: every state the table
        allows). Capacity release and reservation, the worker's stream message, the result, usage
        and the acknowledgement of the stream entry ``ack`` are written in the same atomic step, so a
        task completes once even if delivered twice.

        A task sent back to pending with ``retry_at`` (unix seconds) waits in the retry index until
        then; the scheduler promotes it (see :func:`mloc.lifecycle.requeue`).

        Two shortcuts cost one exchange with Redis instead of two, still atomically: ``create`` is a
        new record (from :meth:`new_record`) stored just before the move, for a submit that already
        knows its worker; ``then`` is a second move made right after this one succeeds, and its
        outcome is the answer (or this one's refusal)."""
        move = Move(
            target,
            sources=sources,
            expect_worker=expect_worker,
            expect_attempt=expect_attempt,
            fields=fields,
            release=release,
            reserve=reserve,
            new_attempt=new_attempt,
            fail_when_attempts_used=fail_when_attempts_used,
            result=result,
            usage=usage,
            owner=owner,
            ack=ack,
            priority=priority,
            created_ms=created_ms,
            now=now,
            retry_at=retry_at,
        )
        return await self.apply(task_id, move, create=create, then=then)

    async def apply(
        self, task_id: str, move: Move, *, create: dict[str, str] | None = None, then: Move | None = None
    ) -> Transition:
        """:meth:`transition` with its arguments in a :class:`Move`."""
        call = self._call(task_id, move)
        if create is not None and then is not None:
            raise ValueError("create and then cannot be combined")
        if create is not None:
            first, second, script = self._create_call(create), call, self._submit
        elif then is not None:
            first, second, script = call, self._call(task_id, then), self._twice
        else:
            return _outcome(await self._transition(keys=call[0], args=call[1]))
        replies = await script(
            keys=[*first[0], *second[0]],
            args=[len(first[0]), len(first[1]), len(second[0]), len(second[1]), *first[1], *second[1]],
        )
        return _outcome(replies[-1])

    def _call(self, task_id: str, move: Move) -> tuple[list[str], list[str]]:
        """The KEYS and ARGV of ``lua.TRANSITION`` for one move."""
        target = move.target
        now = time.time() if move.now is None else move.now
        allowed = sorted(set(move.sources) if move.sources is not None else sources_of(target))
        if not allowed:
            raise InvalidTransition(f"no state may move to {target}")
        extra = dict(move.fields or {})
        if move.result is not None:
            extra["result_summary"] = _json(summarise(move.result))
        owner, usage, reserve = move.owner, move.usage, move.reserve
        # Dummies when nothing is counted (no usage, or no owner to count it for): the script leaves them alone.
        usage_key, days_key, day, day_no = keys.usage_day("-", "-"), keys.usage_days("-"), "", ""
        if usage and owner:
            day, day_no = utc_day(now), str(day_number(now))
            usage_key, days_key = keys.usage_day(owner, day), keys.usage_days(owner)
        reserve_json = ""
        if reserve is not None:
            reserve_json = _json(
                {
                    "worker": reserve.worker_id,
                    "cpu": reserve.cpu,
                    "mem": reserve.mem,
                    "gpus": reserve.gpus,
                    "message": reserve.message,
                    "user": reserve.user,
                    "max_tasks": reserve.max_tasks,
                    "max_gpus": reserve.max_gpus,
                }
            )
        call_keys = [
            keys.task(task_id),
            keys.PENDING,
            keys.EVENTS,
            keys.task_result(task_id),
            usage_key,
            keys.USAGE_OWNERS,
            keys.RETRY_WAIT,
            keys.PENDING_OWNERS,
            days_key,
        ]
        call_args = [
            target.value,
            ",".join(s.value for s in allowed),
            repr(now),
            move.expect_worker or "",
            "" if move.expect_attempt is None else str(move.expect_attempt),
            _json(extra) if extra else "",
            "1" if move.release else "",
            reserve_json,
            repr(pending_score(move.priority, move.created_ms)) if target == TaskState.PENDING else "",
            "1" if move.new_attempt else "",
            _json(move.result) if move.result is not None else "",
            _json(dict(usage)) if usage and owner else "",
            keys.worker("{id}"),
            keys.worker_free_gpus("{id}"),
            keys.worker_tasks("{id}"),
            keys.worker_stream("{id}"),
            keys.tasks_in_state("{id}"),
            keys.SCHEDULER_WAKE,
            "1" if move.fail_when_attempts_used else "",
            task_id,
            owner or "",
            move.ack or "",
            keys.WORKER_GROUP,
            keys.user_usage("{id}"),
            keys.user_quota("{id}"),
            repr(move.retry_at) if move.retry_at is not None and target == TaskState.PENDING else "",
            keys.pending_of("{id}"),
            day_no,
            day,
        ]
        return call_keys, call_args

    # ------------------------------------------------------------------ reads
    async def get_hash(self, task_id: str) -> dict[str, str]:
        return await self.redis.hgetall(keys.task(task_id))

    async def get(self, task_id: str, *, with_spec: bool = True) -> TaskRecord:
        h = await self.get_hash(task_id)
        if not h:
            raise NotFound(f"task {task_id} not found; list tasks with GET /api/v1/tasks")
        return record_of(h, with_spec=with_spec)

    async def get_many(self, task_ids: list[str], *, with_spec: bool = False) -> list[TaskRecord]:
        if not task_ids:
            return []
        # One script reply instead of one per task: the client's cost is per reply.
        rows = await self._read_hashes(keys=[keys.task(task_id) for task_id in task_ids])
        return [record_of(dict(zip(row[::2], row[1::2], strict=True)), with_spec=with_spec) for row in rows if row]

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
