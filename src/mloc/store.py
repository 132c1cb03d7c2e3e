"""Task records in Redis and the one function that changes a task's state."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, lua, transition
from mloc.errors import InvalidTransition, NotFound
from mloc.moves import Change, Move, Reservation
from mloc.records import NewTask, TaskRecord
from mloc.state import TERMINAL, Refusal, TaskState
from mloc.transition import Transition, pending_score, utc_day

# Named here too: callers build reservations and read outcomes through the store.
__all__ = [
    "Apply",
    "Change",
    "Coalescer",
    "Cursor",
    "Reservation",
    "TaskStore",
    "Transition",
    "record_of",
    "require",
    "task_not_found",
    "utc_day",
]
# Moves sent in one script call by :meth:`TaskStore.apply_many`: Redis runs a call start to end,
# so a bound keeps other clients' waits short (about 20 ms at this size).
BATCH_SIZE = 128


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a listing's page ended: its last task's place in the index (its score, then its id)."""

    score: float
    task_id: str

    def follows(self, other: Cursor) -> bool:
        """Whether this place comes after ``other`` in a newest-first listing."""
        return self.score < other.score or (self.score == other.score and self.task_id < other.task_id)

    def encode(self) -> str:
        return f"{self.score!r}:{self.task_id}"

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        """The cursor in ``text`` (as :meth:`encode` writes it), or None when it is not one."""
        score, sep, task_id = text.partition(":")
        try:
            value = float(score)
        except ValueError:
            return None
        return cls(value, task_id) if sep and task_id and math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Apply:
    """One task's move for :meth:`TaskStore.apply_many`: as :meth:`TaskStore.apply`'s arguments."""

    task_id: str
    change: Change
    create: NewTask | None = None
    then: Change | None = None


def task_not_found(task_id: str) -> NotFound:
    """The error for a task id that names no task the caller may see: the same whether the task is
    missing or another user's, so an answer never tells which ids exist."""
    return NotFound(
        f"task {task_id} not found; list tasks with GET /api/v1/tasks (a finished task is removed "
        "MLOC_TASK_RETENTION_SEC after it ended)"
    )


def record_of(h: dict[str, str], *, with_spec: bool) -> TaskRecord:
    """A stored task as the API shows it; a retry waiting out its backoff says how long is left."""
    record = TaskRecord.from_hash(h, with_spec=with_spec)
    retry_at = h.get("retry_at")
    if retry_at and record.state == TaskState.PENDING and float(retry_at) > time.time():
        left = math.ceil(float(retry_at) - time.time())
        record.pending_reason = f"{record.pending_reason or 'retry'}; eligible in {left}s"
    return record


class TaskStore:
    """Reads and writes task records; every state change goes through :meth:`transition`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._transition = redis.register_script(transition.TRANSITION)
        self._create = redis.register_script(lua.CREATE)
        self._each_create = redis.register_script(lua.EACH_CREATE)
        self._read_hashes = redis.register_script(lua.READ_HASHES)
        self._submit = redis.register_script(transition.SUBMIT)
        self._twice = redis.register_script(transition.TRANSITION_TWICE)
        self._each = {
            "one": redis.register_script(transition.EACH),
            "submit": redis.register_script(transition.EACH_SUBMIT),
            "twice": redis.register_script(transition.EACH_TWICE),
        }

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
        task_id: str | None = None,
    ) -> NewTask:
        # The create script moves the order on past the last one any orchestrator gave (see
        # lua.CREATE): a bulk submit queues in the order it was given, and two orchestrators' submits in
        # the order Redis stored them. created_at stays the real time.
        created_at = time.time()
        return NewTask(
            task_id=task_id or str(uuid.uuid4()),
            name=name,
            owner=owner,
            task_type=task_type,
            kind=kind,
            topic=topic,
            priority=priority,
            max_attempts=max_attempts,
            created_at=created_at,
            document=document,
            request=request,
            labels=dict(labels),
        )

    def _create_call(self, task: NewTask) -> tuple[list[str], list[str]]:
        rec = task.to_hash()
        created_ms = task.created_ms
        # created_ms first: the script puts the order it gives in its place (see lua.CREATE).
        del rec["created_ms"]
        fields = ["created_ms", str(created_ms), *(item for pair in rec.items() for item in pair)]
        return (
            [
                keys.task(task.task_id),
                keys.TASKS_ALL,
                keys.tasks_in_state(TaskState.PENDING),
                keys.tasks_of_owner(task.owner),
                keys.PENDING,
                keys.pending_of(task.owner),
                keys.PENDING_OWNERS,
                keys.QUEUE_ORDER,
                keys.TASKS_CHILDREN,
                keys.children_of_owner(task.owner),
            ],
            [
                task.task_id,
                str(created_ms),
                repr(pending_score(task.priority, 0)) if task.queued else "",
                task.owner,
                "1" if task.order_ms is not None else "",
                "1" if task.parent_id is not None else "",
                *fields,
            ],
        )

    async def insert(self, records: list[NewTask], *, pipelines: Mapping[str, str] | None = None) -> None:
        """Store new pending tasks atomically: all or none, in one round trip. A replica group's
        parent is also listed among the open groups, which the orchestrator sweeps until it settles; a
        task that waits for others is listed as their dependent; ``pipelines`` (id -> graph JSON) are
        stored with them."""
        extra = pipelines
        parents = [rec.task_id for rec in records if rec.group_size]
        waiting = [rec for rec in records if rec.waiting_on]
        if len(records) == 1 and not parents and not waiting and not extra:
            task_keys, args = self._create_call(records[0])
            await self._create(keys=task_keys, args=args)
            return
        pipe = self.redis.pipeline(transaction=True)
        for start in range(0, len(records), BATCH_SIZE):
            all_keys, all_args = _each_call([self._create_call(rec) for rec in records[start : start + BATCH_SIZE]])
            await self._each_create(keys=all_keys, args=all_args, client=pipe)
        if parents:
            pipe.sadd(keys.GROUPS_OPEN, *parents)
        for rec in waiting:
            pipe.sadd(keys.DEPS_WAITING, rec.task_id)
            for parent in rec.waiting_on:
                pipe.sadd(keys.dependents(parent), rec.task_id)
        for pipeline_id, graph in (extra or {}).items():
            pipe.set(keys.pipeline(pipeline_id), graph)
            # Indexed by owner too, as tasks are, so a short pipeline id names one of the caller's.
            made = json.loads(graph)
            pipe.zadd(keys.PIPELINES, {pipeline_id: made["created_at"]})
            pipe.zadd(keys.pipelines_of_owner(made["owner"]), {pipeline_id: made["created_at"]})
        await pipe.execute()

    # ------------------------------------------------------------- transition
    async def transition(
        self,
        task_id: str,
        move: Move,
        *,
        expect_worker: str | None = None,
        expect_attempt: int | None = None,
        fields: Mapping[str, str] | None = None,
        release: bool = False,
        reserve: Reservation | None = None,
        new_attempt: bool = False,
        result: Mapping[str, Any] | None = None,
        usage: Mapping[str, float] | None = None,
        owner: str | None = None,
        ack: str | None = None,
        priority: int = 0,
        created_ms: int = 0,
        now: float | None = None,
        retry_at: float | None = None,
        create: NewTask | None = None,
        then: Change | None = None,
    ) -> Transition:
        """Make ``move`` (one of :mod:`mloc.moves`) if the task is in one of its source states, and
        fenced on ``expect_worker`` and ``expect_attempt`` when given. In the same atomic step:
        ``release`` gives back the capacity and quota the task holds, ``reserve`` takes them on a
        worker and writes the assignment to its stream, ``new_attempt`` counts an attempt, ``fields``
        are written, ``result`` is stored, ``usage`` is added to ``owner``'s day, and the stream entry
        ``ack`` is acknowledged, so a task completes once even if delivered twice.

        A task sent back to pending waits in the pending queues at ``priority``/``created_ms``, or
        with ``retry_at`` (unix seconds) in the retry index until then; the scheduler promotes it
        (see :func:`mloc.requeue.requeue`).

        Two shortcuts cost one exchange with Redis instead of two, still atomically: ``create`` is a
        new record (from :meth:`new_record`) stored just before the move, for a submit that already
        knows its worker; ``then`` is a second change made right after this one succeeds, and its
        outcome is the answer (or this one's refusal)."""
        change = Change(
            move,
            expect_worker=expect_worker,
            expect_attempt=expect_attempt,
            fields=fields,
            release=release,
            reserve=reserve,
            new_attempt=new_attempt,
            result=result,
            usage=usage,
            owner=owner,
            ack=ack,
            priority=priority,
            created_ms=created_ms,
            now=now,
            retry_at=retry_at,
        )
        return await self.apply(task_id, change, create=create, then=then)

    async def apply(
        self, task_id: str, change: Change, *, create: NewTask | None = None, then: Change | None = None
    ) -> Transition:
        """:meth:`transition` with its arguments in a :class:`~mloc.moves.Change`. Raises
        :class:`InvalidTransition`, before Redis is touched, for a move the state table forbids."""
        kind, task_keys, args = self._call(Apply(task_id, change, create, then))
        if kind == "one":
            return transition.outcome(await self._transition(keys=task_keys, args=args))
        script = self._submit if kind == "submit" else self._twice
        return transition.outcome((await script(keys=task_keys, args=args))[-1])

    async def apply_many(self, items: Sequence[Apply]) -> list[Transition]:
        """Many tasks' moves in as few round trips as their kinds allow (one per kind and
        :data:`BATCH_SIZE`), each as :meth:`apply` would make it: one item's refusal leaves the
        others alone. Every move is checked against the state table before any is sent. The
        outcomes come back in the order of ``items``."""
        calls = [self._call(item) for item in items]
        outcomes: list[Transition | None] = [None] * len(calls)
        for kind in ("one", "submit", "twice"):
            mine = [index for index, call in enumerate(calls) if call[0] == kind]
            for start in range(0, len(mine), BATCH_SIZE):
                chunk = mine[start : start + BATCH_SIZE]
                all_keys, all_args = _each_call([calls[index][1:] for index in chunk])
                replies = await self._each[kind](keys=all_keys, args=all_args)
                for index, reply in zip(chunk, replies, strict=True):
                    outcomes[index] = transition.outcome(reply if kind == "one" else reply[-1])
        return [outcome for outcome in outcomes if outcome is not None]

    def _call(self, item: Apply) -> tuple[str, list[str], list[Any]]:
        """Which script makes ``item`` (one move, create then move, or two moves) and its KEYS
        and ARGV, laid out as :func:`mloc.lua.sequence` takes them for the two-part ones."""
        item.change.move.check()
        if item.then is not None:
            item.then.move.check()
        if item.create is not None and item.then is not None:
            raise ValueError("create and then cannot be combined")
        call = transition.arguments(item.task_id, item.change)
        if item.create is not None:
            kind, first, second = "submit", self._create_call(item.create), call
        elif item.then is not None:
            kind, first, second = "twice", call, transition.arguments(item.task_id, item.then)
        else:
            return "one", call[0], call[1]
        return (
            kind,
            [*first[0], *second[0]],
            [len(first[0]), len(first[1]), len(second[0]), len(second[1]), *first[1], *second[1]],
        )

    # ------------------------------------------------------------------ reads
    async def ids_starting_with(self, prefix: str, owner: str | None, *, most: int) -> list[str]:
        """Ids of ``owner``'s tasks (every task's for None) that start with ``prefix``: at most ``most``
        plus one, so a caller can tell that more match. Ids are random and the index is scored by time,
        so a prefix has no range to read: the scan walks the index, stopping as soon as enough match."""
        return await self._scan(keys.TASKS_ALL if owner is None else keys.tasks_of_owner(owner), prefix, most)

    async def pipeline_ids_starting_with(self, prefix: str, owner: str | None, *, most: int) -> list[str]:
        """As :meth:`ids_starting_with`, for pipelines (those made before they were indexed are not found)."""
        return await self._scan(keys.PIPELINES if owner is None else keys.pipelines_of_owner(owner), prefix, most)

    async def _scan(self, index: str, prefix: str, most: int) -> list[str]:
        found: list[str] = []
        async for member, _ in self.redis.zscan_iter(index, match=f"{prefix}*", count=1000):
            found.append(member.decode() if isinstance(member, bytes) else member)
            if len(found) > most:
                break
        return found

    async def get_hash(self, task_id: str) -> dict[str, str]:
        return await self.redis.hgetall(keys.task(task_id))

    async def get(self, task_id: str, *, with_spec: bool = True) -> TaskRecord:
        h = await self.get_hash(task_id)
        if not h:
            raise task_not_found(task_id)
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
        children: bool = False,
        after: Cursor | None = None,
    ) -> tuple[list[TaskRecord], int, Cursor | None]:
        """Newest first: the tasks of page ``page``, or the ``page_size`` that come after ``after`` (the
        cursor of a page's last task), with how many match in all and the cursor of the page's last task
        when more follow it. A cursor is not moved by tasks that arrive or leave meanwhile, as a page's
        offset is. Filters by state and owner use their indexes; task_type filters while walking. Tasks
        that are part of another (a dataset task's chunks, a replica group's shards) are left out unless
        ``children``: each is reached from the task it makes up."""
        if owner:
            index, parts = keys.tasks_of_owner(owner), keys.children_of_owner(owner)
        elif state:
            index, parts = keys.tasks_in_state(state), keys.TASKS_CHILDREN
        else:
            index, parts = keys.TASKS_ALL, keys.TASKS_CHILDREN
        skip = None if children else parts
        if (owner and state) or task_type:
            # No combined index: walk the narrower one and filter, in bounded batches, counting them all.
            first = 0 if after is not None else (page - 1) * page_size
            taken: list[tuple[TaskRecord, Cursor]] = []
            total = position = 0  # position: among the matches this listing shows (after the cursor)
            more = False
            async for batch in self._walk(index, skip):
                scores = dict(batch)
                for rec in await self.get_many(list(scores)):
                    if (state and rec.state != state) or (task_type and rec.task_type != task_type):
                        continue
                    total += 1
                    cursor = Cursor(scores[rec.task_id], rec.task_id)
                    if after is not None and not cursor.follows(after):
                        continue
                    if first <= position < first + page_size:
                        taken.append((rec, cursor))
                    elif position >= first + page_size:
                        more = True
                    position += 1
            records = [rec for rec, _ in taken]
            last = taken[-1][1] if taken and more else None
            return _families_together(records) if children else records, total, last
        wanted: list[tuple[str, float]] = []
        offset = 0 if after is not None else (page - 1) * page_size
        seen = 0
        async for batch in self._walk(index, skip, after=after):
            wanted += batch[max(0, offset - seen) : max(0, offset + page_size + 1 - seen)]
            seen += len(batch)
            if seen > offset + page_size:
                break
        last = Cursor(wanted[page_size - 1][1], wanted[page_size - 1][0]) if len(wanted) > page_size else None
        records = await self.get_many([task_id for task_id, _ in wanted[:page_size]])
        if children:
            return _families_together(records), await self.redis.zcard(index), last
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(index)
        if state:
            pipe.zintercard(2, [parts, index])
        else:
            pipe.zcard(parts)
        everything, part_count = await pipe.execute()
        return records, max(0, everything - part_count), last

    async def _walk(
        self, index: str, parts: str | None, *, after: Cursor | None = None
    ) -> AsyncIterator[list[tuple[str, float]]]:
        """The ids in ``index`` with their scores, newest first (those after ``after`` only), in bounded
        batches, less those in ``parts`` (a zset). Each batch starts after the last one's final entry,
        so tasks added or removed meanwhile move nothing."""
        batch = 1000
        if after is not None:
            # Ties (a task and its parts share their place) are ordered by id, descending, as ZREVRANGE does.
            tied = await self.redis.zrange(index, after.score, after.score, byscore=True)
            earlier = [(task_id, after.score) for task_id in reversed(tied) if task_id < after.task_id]
            if earlier:
                yield await self._without(parts, earlier)
        top: float | str = "+inf" if after is None else f"({after.score!r}"
        while True:
            rows = await self.redis.zrange(
                index, top, "-inf", desc=True, byscore=True, offset=0, num=batch, withscores=True
            )
            if not rows:
                return
            lowest = rows[-1][1]
            # The next batch starts below this one's lowest score; entries tied at it come now, whole.
            tied = [(task_id, lowest) for task_id in await self.redis.zrange(index, lowest, lowest, byscore=True)]
            rows = [(task_id, score) for task_id, score in rows if score != lowest] + list(reversed(tied))
            yield await self._without(parts, rows)
            top = f"({lowest!r}"

    async def _without(self, parts: str | None, rows: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if parts is None or not rows:
            return rows
        scores = await self.redis.zmscore(parts, [task_id for task_id, _ in rows])
        return [row for row, score in zip(rows, scores, strict=True) if score is None]

    async def result(self, task_id: str) -> Any:
        raw = await self.redis.get(keys.task_result(task_id))
        return json.loads(raw) if raw else None

    async def set_fields(self, task_id: str, fields: Mapping[str, str]) -> None:
        """Write informational fields (progress, pending reason) that are not state."""
        await self.redis.hset(keys.task(task_id), mapping=dict(fields))

    async def counts_by_state(self) -> dict[str, int]:
        """Tasks by state as `mloc tasks` lists them: a dataset task's chunks and a replica group's
        shards are not counted apart from their task."""
        pipe = self.redis.pipeline(transaction=False)
        for state in TaskState:
            pipe.zcard(keys.tasks_in_state(state))
            pipe.zintercard(2, [keys.TASKS_CHILDREN, keys.tasks_in_state(state)])
        counted = await pipe.execute()
        return {state.value: counted[2 * i] - counted[2 * i + 1] for i, state in enumerate(TaskState)}


def _families_together(records: list[TaskRecord]) -> list[TaskRecord]:
    """A page's tasks in the index's order, but each task's parts right after it, in their order (chunk
    or shard index): they share its place in the index, where a tie is ordered by id."""
    first: dict[str, int] = {}
    for position, rec in enumerate(records):
        first.setdefault(rec.parent_id or rec.task_id, position)

    def place(rec: TaskRecord) -> tuple[int, bool, int]:
        return (first[rec.parent_id or rec.task_id], rec.parent_id is not None, rec.replica or 0)

    return sorted(records, key=place)


class Coalescer:
    """Moves asked for by concurrent coroutines, sent together through :meth:`TaskStore.apply_many`:
    each caller awaits its own outcome, as from :meth:`TaskStore.apply`. The moves asked for while
    one batch is on its way go in the next, so a worker finishing many short tasks pays one round
    trip per batch, not per task (and an orchestrator answering many submits at once, one per batch of
    them), while a lone move waits for nothing but one turn of the loop."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._queue: list[tuple[Apply, asyncio.Future[Transition]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def apply(
        self, task_id: str, change: Change, *, create: NewTask | None = None, then: Change | None = None
    ) -> Transition:
        # Checked here, so a forbidden move raises to its caller and never fails the others' batch.
        change.move.check()
        if then is not None:
            then.move.check()
        if create is not None and then is not None:
            raise ValueError("create and then cannot be combined")
        future: asyncio.Future[Transition] = asyncio.get_running_loop().create_future()
        self._queue.append((Apply(task_id, change, create, then), future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # the moves asked for in this turn of the loop join the batch
                batch, self._queue = self._queue, []
                try:
                    outcomes = await self.store.apply_many([item for item, _ in batch])
                except Exception as exc:  # every caller gets the error, as from apply
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._sender = None


def _each_call(calls: Sequence[tuple[list[str], list[Any]]]) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one :func:`mloc.lua.each` call that runs ``calls`` (each its own KEYS and
    ARGV): the count, each call's key and argument counts, then their keys and arguments in order."""
    counts = [count for task_keys, args in calls for count in (len(task_keys), len(args))]
    return (
        [key for task_keys, _ in calls for key in task_keys],
        [len(calls), *counts, *(arg for _, args in calls for arg in args)],
    )


def require(outcome: Transition, task_id: str, target: TaskState) -> Transition:
    """Turn a refused transition into the error a person sees."""
    if outcome.ok:
        return outcome
    if outcome.error == Refusal.MISSING:
        raise task_not_found(task_id)
    if outcome.error == Refusal.STATE and outcome.detail in TERMINAL:
        raise InvalidTransition(f"task {task_id} has already ended: it is {outcome.detail}, and cannot become {target}")
    if outcome.error == Refusal.STATE:
        raise InvalidTransition(f"task {task_id} is {outcome.detail}; it cannot become {target}")
    raise InvalidTransition(f"task {task_id} could not become {target}: {outcome.error} {outcome.detail}")
