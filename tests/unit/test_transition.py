"""mloc.transition: the transition script against a real redis-server, one named part at a time, and
each way it refuses a move (with nothing written when it does)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from mloc import keys, lua, moves, tasklog, transition
from mloc.moves import Change, Move, Reservation
from mloc.state import ALLOWED, Refusal, TaskState
from mloc.store import Apply, TaskStore
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration

Scenario = Callable[[aioredis.Redis, TaskStore], Awaitable[None]]


@asynccontextmanager
async def connected(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, TaskStore]]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await WorkerRegistry(r).register(registration("w1", gpus=2, cpu=2000, memory=1000))
        yield r, TaskStore(r)
    finally:
        await r.aclose()


def run(redis_url: str, scenario: Scenario) -> None:
    async def main() -> None:
        async with connected(redis_url) as (r, store):
            await scenario(r, store)

    asyncio.run(main())


async def new_task(store: TaskStore, owner: str = "alice", *, max_attempts: int = 2, **extra: str) -> str:
    record = echo_record(store, owner, max_attempts=max_attempts)
    await store.insert([record])
    if extra:
        await store.redis.hset(keys.task(record.task_id), mapping=extra)
    return record.task_id


def reservation(cpu: int = 500, mem: int = 100, gpus: list[int] | None = None, **extra: Any) -> Reservation:
    return Reservation("w1", cpu, mem, gpus or [], '{"hello": 1}', user="alice", **extra)


async def raw(r: aioredis.Redis, task_id: str, change: Change) -> list[str]:
    """The script called directly, past the check :meth:`TaskStore.apply` makes first."""
    task_keys, args = transition.arguments(task_id, change)
    return list(await r.eval(transition.TRANSITION, len(task_keys), *task_keys, *args))


async def snapshot(r: aioredis.Redis, task_id: str) -> tuple[Any, ...]:
    """Everything a refused move must leave as it was."""
    return (
        await r.hgetall(keys.task(task_id)),
        await r.hgetall(keys.worker("w1")),
        await r.smembers(keys.worker_free_gpus("w1")),
        await r.hgetall(keys.user_usage("alice")),
        await r.xlen(keys.EVENTS),
        await r.xlen(keys.worker_stream("w1")),
    )


# ---------------------------------------------------------------- the table
def test_the_script_refuses_every_move_the_table_forbids_even_when_python_is_bypassed(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        refused = 0
        for state in TaskState:
            for target in TaskState:
                await r.hset(keys.task(task_id), "state", state.value)
                reply = await raw(r, task_id, Change(Move("probe", target, frozenset({state}))))
                if target in ALLOWED[state]:
                    assert reply[:2] != ["err", Refusal.FORBIDDEN], (state, target, reply)
                else:
                    assert reply == ["err", Refusal.FORBIDDEN, f"{state} -> {target}"], (state, target)
                    refused += 1
        assert refused == len(TaskState) ** 2 - sum(len(targets) for targets in ALLOWED.values())

    run(redis_url, scenario)


def test_the_generated_constants_are_the_pythons() -> None:
    script = transition.TRANSITION
    for refusal in Refusal:
        assert f'local REFUSED_{refusal.name} = "{refusal.value}"' in script
    edges = next(line for line in script.splitlines() if line.startswith("local ALLOWED = "))
    listed = set(edges.split('"')[1].split())
    assert listed == {f"{source}>{target}" for source, targets in ALLOWED.items() for target in targets}
    assert f'local KEY_RESULT = "{keys.task_result("{id}")}"' in script
    assert f'local KEY_WAKE = "{keys.SCHEDULER_WAKE}"' in script


def test_every_script_made_of_moves_writes_what_they_gathered_at_its_end() -> None:
    """A move only gathers usage, outcome counts and wake-ups; a script of moves without ``finish()``
    last would drop them without a word. Every script the store registers is checked, so a new one
    made without it fails here."""
    store = TaskStore(aioredis.Redis())
    registered = [
        script
        for value in vars(store).values()
        for script in (value.values() if isinstance(value, dict) else [value])
        if isinstance(script, AsyncScript)
    ]
    made_of_moves = [script.script for script in registered if "local function finish()" in str(script.script)]
    assert len(made_of_moves) == 6  # one move, submit, two moves; each alone and in batches
    for text in made_of_moves:
        *_, closing, returned = str(text).rstrip().splitlines()
        assert (closing.strip(), returned.split()[0]) == (transition.FINISH, "return"), text[-300:]
    # And the check sees the mistake it is there for.
    *_, closing, _ = lua.each(transition._MOVE).rstrip().splitlines()
    assert closing.strip() != transition.FINISH


# ---------------------------------------------------------------- refusals
def test_a_missing_task_and_a_task_in_another_state_are_refused(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        missing = await store.transition("no-such-task", moves.CANCEL)
        assert (missing.ok, missing.error) == (False, Refusal.MISSING)
        task_id = await new_task(store)
        before = await snapshot(r, task_id)
        early = await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
        assert (early.error, early.detail) == (Refusal.STATE, "pending")
        assert await snapshot(r, task_id) == before

    run(redis_url, scenario)


def test_a_move_fenced_on_another_worker_or_attempt_is_refused(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        assert (await store.transition(task_id, moves.PLACE, reserve=reservation())).ok
        assert (await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)).ok
        before = await snapshot(r, task_id)
        other = await store.transition(task_id, moves.SUCCEED, expect_worker="w2", release=True)
        assert (other.error, other.detail) == (Refusal.FENCED, "w1")
        stale = await store.transition(task_id, moves.SUCCEED, expect_worker="w1", expect_attempt=0, release=True)
        assert (stale.error, stale.detail) == (Refusal.FENCED, "1")
        assert await snapshot(r, task_id) == before

    run(redis_url, scenario)


@pytest.mark.parametrize(
    ("ask", "detail"),
    [
        ({"cpu": 5000}, "cpu"),
        ({"mem": 5000}, "memory"),
        ({"gpus": [7]}, "gpu 7"),
    ],
)
def test_a_reservation_past_the_workers_capacity_is_refused(redis_url: str, ask: dict[str, Any], detail: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        before = await snapshot(r, task_id)
        outcome = await store.transition(task_id, moves.PLACE, reserve=reservation(**ask))
        assert (outcome.error, outcome.detail) == (Refusal.CAPACITY, detail)
        assert await snapshot(r, task_id) == before

    run(redis_url, scenario)


def test_a_worker_without_free_slots_or_not_active_takes_nothing(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        await r.hset(keys.worker("w1"), "slots_free", "0")
        full = await store.transition(task_id, moves.PLACE, reserve=reservation())
        assert (full.error, full.detail) == (Refusal.CAPACITY, "slots")
        await r.hset(keys.worker("w1"), mapping={"slots_free": "4", "status": "draining"})
        before = await snapshot(r, task_id)
        draining = await store.transition(task_id, moves.PLACE, reserve=reservation())
        assert (draining.error, draining.detail) == (Refusal.CAPACITY, "worker not active")
        assert await snapshot(r, task_id) == before

    run(redis_url, scenario)


def test_a_reservation_over_the_owners_quota_is_refused(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        first, second = await new_task(store), await new_task(store)
        assert (await store.transition(first, moves.PLACE, reserve=reservation(max_tasks=1))).ok
        before = await snapshot(r, second)
        over = await store.transition(second, moves.PLACE, reserve=reservation(max_tasks=1))
        assert (over.error, over.detail) == (Refusal.QUOTA, "tasks 1 1")
        assert await snapshot(r, second) == before
        await r.hset(keys.user_quota("alice"), mapping={"tasks": "0", "gpus": "1"})
        gpus = await store.transition(second, moves.PLACE, reserve=reservation(gpus=[0, 1]))
        assert (gpus.error, gpus.detail) == (Refusal.QUOTA, "gpus 0 1")

    run(redis_url, scenario)


def test_a_retry_placed_before_its_backoff_ends_is_refused(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        assert (await store.transition(task_id, moves.PLACE, reserve=reservation())).ok
        assert (await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)).ok
        later = 2_000_000_000.0
        back = await store.transition(task_id, moves.REQUEUE, expect_worker="w1", release=True, retry_at=later)
        assert back.ok and back.state == TaskState.PENDING
        before = await snapshot(r, task_id)
        early = await store.transition(task_id, moves.PLACE, reserve=reservation())
        assert (early.error, early.detail) == (Refusal.BACKOFF, repr(later))
        assert await snapshot(r, task_id) == before

    run(redis_url, scenario)


# ---------------------------------------------------------------- parts
def test_reserve_takes_capacity_and_quota_and_writes_the_assignment(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        placed = await store.transition(task_id, moves.PLACE, reserve=reservation(gpus=[1]), fields={"gpus": "[1]"})
        assert placed.ok and (placed.previous, placed.state) == ("pending", TaskState.ASSIGNED)
        worker = await r.hgetall(keys.worker("w1"))
        assert (worker["cpu_free"], worker["mem_free"], worker["slots_free"]) == ("1500", "900", "3")
        assert await r.smembers(keys.worker_free_gpus("w1")) == {"0"}
        assert await r.smembers(keys.worker_tasks("w1")) == {task_id}
        assert await r.hgetall(keys.user_usage("alice")) == {"tasks": "1", "gpus": "1"}
        h = await r.hgetall(keys.task(task_id))
        assert (h["state"], h["worker_id"], h["gpus"]) == ("assigned", "w1", "[1]")
        assert json.loads(h["hold"]) == {"cpu": 500, "mem": 100, "gpus": [1], "user": "alice"}
        [(_, entry)] = await r.xrange(keys.worker_stream("w1"))
        assert entry == {"task": task_id, "body": '{"hello": 1}', "attempt": "1"}
        # Placed tasks leave the pending indexes, the owner's queue and the set of owners waiting.
        assert await r.zscore(keys.PENDING, task_id) is None
        assert not await r.exists(keys.pending_of("alice"))
        assert not await r.sismember(keys.PENDING_OWNERS, "alice")
        assert await r.zscore(keys.tasks_in_state("assigned"), task_id) is not None
        assert await r.zscore(keys.tasks_in_state("pending"), task_id) is None

    run(redis_url, scenario)


def test_a_slot_only_task_takes_and_gives_back_a_slot_alone(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)

        async def increments() -> int:  # HINCRBYs run so far, the script's own included
            return int((await r.info("commandstats")).get("cmdstat_hincrby", {}).get("calls", 0))

        before = await increments()
        assert (await store.transition(task_id, moves.PLACE, reserve=reservation(cpu=0, mem=0))).ok
        worker = await r.hgetall(keys.worker("w1"))
        assert (worker["cpu_free"], worker["mem_free"], worker["slots_free"]) == ("2000", "1000", "3")
        assert (await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)).ok
        assert (await store.transition(task_id, moves.SUCCEED, expect_worker="w1", expect_attempt=1, release=True)).ok
        worker = await r.hgetall(keys.worker("w1"))
        assert (worker["cpu_free"], worker["mem_free"], worker["slots_free"]) == ("2000", "1000", "4")
        assert await r.hget(keys.task(task_id), "hold") == ""
        # The slot and the owner's task count, each taken and given back, and the end counted once: no
        # write of a zero.
        assert await increments() - before == 5
        assert await r.hgetall(keys.TASK_OUTCOMES) == {"succeeded:echo": "1"}

    run(redis_url, scenario)


def test_every_end_is_counted_by_state_and_task_type_and_a_resume_takes_nothing_back(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        cancelled, failed = await new_task(store), await new_task(store)
        untyped = await new_task(store)
        await r.hdel(keys.task(untyped), "task_type")  # a record written before task types were kept
        assert (await store.transition(cancelled, moves.CANCEL)).ok
        assert not (await store.transition(cancelled, moves.CANCEL)).ok  # refused: counts nothing
        assert (await store.transition(failed, moves.PLACE, reserve=reservation())).ok
        assert (await store.transition(failed, moves.START, expect_worker="w1", new_attempt=True)).ok
        assert await r.hgetall(keys.TASK_OUTCOMES) == {"cancelled:echo": "1"}  # placing and starting end nothing
        assert (await store.transition(failed, moves.FAIL, expect_worker="w1", release=True)).ok
        assert (await store.transition(untyped, moves.CANCEL)).ok
        # Resumed, the ends stand; ended again, it counts again.
        assert (await store.transition(cancelled, moves.RESUME, priority=0, created_ms=5)).ok
        assert await r.hgetall(keys.TASK_OUTCOMES) == {"cancelled:echo": "1", "failed:echo": "1", "cancelled:": "1"}
        assert (await store.transition(cancelled, moves.CANCEL)).ok
        assert await r.hgetall(keys.TASK_OUTCOMES) == {"cancelled:echo": "2", "failed:echo": "1", "cancelled:": "1"}

    run(redis_url, scenario)


def test_new_attempt_counts_a_start_and_release_gives_everything_back(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        await store.transition(task_id, moves.PLACE, reserve=reservation(gpus=[0, 1]))
        started = await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
        assert started.attempt == 1 and await r.hget(keys.task(task_id), "attempts") == "1"
        done = await store.transition(task_id, moves.SUCCEED, expect_worker="w1", expect_attempt=1, release=True)
        assert done.ok and done.attempt == 1
        worker = await r.hgetall(keys.worker("w1"))
        assert (worker["cpu_free"], worker["mem_free"], worker["slots_free"]) == ("2000", "1000", "4")
        assert await r.smembers(keys.worker_free_gpus("w1")) == {"0", "1"}
        assert await r.smembers(keys.worker_tasks("w1")) == set()
        assert await r.hgetall(keys.user_usage("alice")) == {"tasks": "0", "gpus": "0"}
        assert await r.hget(keys.task(task_id), "hold") == ""

    run(redis_url, scenario)


def test_fields_are_set_and_an_empty_value_deletes_one(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        await store.transition(task_id, moves.CANCEL, fields={"reason": "by me", "pending_reason": ""}, now=123.5)
        h = await r.hgetall(keys.task(task_id))
        assert (h["state"], h["reason"], h["updated_at"]) == ("cancelled", "by me", "123.5")
        assert "pending_reason" not in h

    run(redis_url, scenario)


def test_log_lines_are_written_with_a_move_that_is_made_and_never_with_a_refused_one(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        line = tasklog.stored(tasklog.Line("cancelled", "cancelled by me"))
        refused = Change(moves.START, log=(line,), log_retention_sec=60)
        assert not (await store.apply(task_id, refused)).ok
        assert not await r.exists(keys.task_logs(task_id))
        second = tasklog.stored(tasklog.Line("note", "a second line"))
        assert (await store.apply(task_id, Change(moves.CANCEL, log=(line, second)))).ok
        entries = await r.xrange(keys.task_logs(task_id))
        assert [fields for _, fields in entries] == [line, second]
        assert await r.ttl(keys.task_logs(task_id)) == -1  # no retention asked: the expiry is left alone
        kept = await new_task(store)
        assert (await store.apply(kept, Change(moves.CANCEL, log=(line,), log_retention_sec=60))).ok
        assert 0 < await r.ttl(keys.task_logs(kept)) <= 60

    run(redis_url, scenario)


def test_requeue_indexes_a_placeable_task_and_a_delayed_retry_apart(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        now_id, later_id = await new_task(store), await new_task(store, "bob")
        for task_id in (now_id, later_id):
            await store.transition(task_id, moves.PLACE, reserve=reservation())
        wake = r.pubsub()
        await wake.subscribe(keys.SCHEDULER_WAKE)
        await wake.get_message(timeout=1)  # the subscription itself
        back = await store.transition(now_id, moves.REQUEUE, release=True, priority=2, created_ms=1000)
        assert back.ok
        score = transition.pending_score(2, 1000)
        assert await r.zscore(keys.PENDING, now_id) == score
        assert await r.zscore(keys.pending_of("alice"), now_id) == score
        assert await r.sismember(keys.PENDING_OWNERS, "alice")
        await store.transition(later_id, moves.REQUEUE, release=True, retry_at=2_000_000_000.5)
        assert await r.zscore(keys.RETRY_WAIT, later_id) == 2_000_000_000.5
        assert await r.zscore(keys.PENDING, later_id) is None
        assert await r.hget(keys.task(later_id), "retry_at") == "2000000000.5"
        message = await wake.get_message(timeout=1)
        assert message is not None and message["data"] == "pending"
        await wake.aclose()

    run(redis_url, scenario)


def test_a_resumed_task_is_queued_and_one_waiting_again_joins_no_queue(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        resumed, waiting = await new_task(store), await new_task(store)
        for task_id in (resumed, waiting):
            assert (await store.transition(task_id, moves.CANCEL)).ok
        assert (await store.transition(resumed, moves.RESUME, priority=1, created_ms=5)).ok
        assert await r.zscore(keys.PENDING, resumed) == transition.pending_score(1, 5)
        assert await r.zscore(keys.tasks_in_state(TaskState.CANCELLED), resumed) is None
        change = Change(moves.REWAIT, waits=True, fields={"waiting_on": json.dumps([resumed])})
        assert (await store.apply(waiting, change)).ok
        assert await r.hget(keys.task(waiting), "state") == TaskState.PENDING
        assert await r.zscore(keys.PENDING, waiting) is None
        assert await r.zscore(keys.pending_of("alice"), waiting) is None
        assert await r.sismember(keys.DEPS_WAITING, waiting)
        # A success is final: nothing takes it back to pending.
        assert (await store.transition(resumed, moves.PLACE, reserve=reservation())).ok
        assert (await store.transition(resumed, moves.START, new_attempt=True)).ok
        assert (await store.transition(resumed, moves.SUCCEED, release=True)).ok
        refused = await raw(
            r, resumed, Change(moves.Move("again", TaskState.PENDING, frozenset({TaskState.SUCCEEDED})))
        )
        assert refused[:2] == ["err", Refusal.FORBIDDEN]

    run(redis_url, scenario)


def test_result_usage_and_ack_are_written_with_the_ending(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        await r.xgroup_create(keys.worker_stream("w1"), keys.WORKER_GROUP, id="0", mkstream=True)
        await store.transition(task_id, moves.PLACE, reserve=reservation())
        [[_, [(entry_id, _)]]] = await r.xreadgroup(keys.WORKER_GROUP, "w1", {keys.worker_stream("w1"): ">"})
        await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
        big = {"ok": True, "items": ["x" * 1000] * 40}
        now = 1_700_000_000.0  # 2023-11-14 UTC
        done = await store.transition(
            task_id,
            moves.SUCCEED,
            expect_worker="w1",
            release=True,
            result=big,
            usage={"tasks": 1, "wall_sec": 0.123456789012345678},
            owner="alice",
            ack=entry_id,
            now=now,
        )
        assert done.ok
        assert json.loads(await r.get(keys.task_result(task_id))) == big
        summary = json.loads(await r.hget(keys.task(task_id), "result_summary"))
        assert summary["truncated"] is True and "items" not in summary
        day = keys.usage_day("alice", "2023-11-14")
        # Exact to the last digit, not Lua's 14-digit rendering of a number.
        assert await r.hget(day, "wall_sec") == "0.12345678901234568"
        assert await r.sismember(keys.USAGE_OWNERS, "alice")
        assert await r.zscore(keys.usage_days("alice"), "2023-11-14") == 19675
        assert await r.xlen(keys.worker_stream("w1")) == 0
        assert (await r.xpending(keys.worker_stream("w1"), keys.WORKER_GROUP))["pending"] == 0
        *_, (_, event) = await r.xrange(keys.EVENTS)
        assert event == {"task": task_id, "from": "running", "to": "succeeded", "ts": repr(now), "move": "succeed"}

    run(redis_url, scenario)


def test_a_shard_that_starts_or_ends_marks_its_parent_and_wakes_the_scheduler(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        shard = await new_task(store, parent_id="the-parent")
        plain = await new_task(store)
        await store.transition(plain, moves.PLACE, reserve=reservation())
        await store.transition(plain, moves.START, expect_worker="w1", new_attempt=True)
        assert not await r.exists(keys.GROUPS_TO_SETTLE)
        await store.transition(shard, moves.PLACE, reserve=reservation())
        assert not await r.exists(keys.GROUPS_TO_SETTLE)  # placing a shard is no news for the parent
        wake = r.pubsub()
        await wake.subscribe(keys.SCHEDULER_WAKE)
        await wake.get_message(timeout=1)
        await store.transition(shard, moves.START, expect_worker="w1", new_attempt=True)
        assert await r.smembers(keys.GROUPS_TO_SETTLE) == {"the-parent"}
        message = await wake.get_message(timeout=1)
        assert message is not None and message["data"] == "running"
        await r.delete(keys.GROUPS_TO_SETTLE)
        await store.transition(shard, moves.FAIL, expect_worker="w1", release=True)
        assert await r.smembers(keys.GROUPS_TO_SETTLE) == {"the-parent"}
        await wake.aclose()

    run(redis_url, scenario)


# ---------------------------------------------------------------- one round trip for two steps
def test_create_stores_and_places_a_new_task_in_one_call(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        record = echo_record(store)
        placed = await store.transition(record.task_id, moves.PLACE, reserve=reservation(), create=record)
        assert placed.ok and await r.hget(keys.task(record.task_id), "state") == "assigned"
        assert await r.zscore(keys.TASKS_ALL, record.task_id) is not None

    run(redis_url, scenario)


async def queued(r: aioredis.Redis, task_id: str, owner: str = "alice") -> tuple[Any, ...]:
    """Where a task stands in the pending queues: the global one, its owner's, the owners listed."""
    return (
        await r.zscore(keys.PENDING, task_id),
        await r.zscore(keys.pending_of(owner), task_id),
        owner in await r.smembers(keys.PENDING_OWNERS),
    )


def test_a_task_placed_as_it_is_submitted_never_enters_the_pending_queues(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        record = echo_record(store)
        waiting = {
            keys.PENDING,
            keys.pending_of("alice"),
            keys.PENDING_OWNERS,
            keys.RETRY_WAIT,
            keys.tasks_in_state(TaskState.PENDING),
        }
        writes: list[str] = []
        async with r.monitor() as monitor:
            placed = await store.transition(record.task_id, moves.PLACE, reserve=reservation(), create=record)
            async for entry in monitor.listen():
                name, *args = entry["command"].split()
                if (
                    entry.get("client_type") == "lua"
                    and name in ("ZADD", "SADD", "ZREM", "SREM")
                    and args[0] in waiting
                ):
                    writes.append(entry["command"])
                if name == "XADD" and args[0] == keys.EVENTS:  # the script's last write
                    break
        assert placed.ok and await r.hget(keys.task(record.task_id), "state") == "assigned"
        assert writes == [] and await queued(r, record.task_id) == (None, None, False)
        created_ms = await r.hget(keys.task(record.task_id), "created_ms")
        assert await r.zscore(keys.tasks_in_state(TaskState.ASSIGNED), record.task_id) == int(created_ms)
        assert await r.zscore(keys.tasks_in_state(TaskState.PENDING), record.task_id) is None

    run(redis_url, scenario)


@pytest.mark.parametrize(
    ("ask", "refusal"),
    [({"cpu": 9000}, Refusal.CAPACITY), ({"max_tasks": 1}, Refusal.QUOTA)],
)
def test_a_task_refused_as_it_is_submitted_is_queued_as_a_stored_one_is(
    redis_url: str, ask: dict[str, Any], refusal: Refusal
) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        if refusal == Refusal.QUOTA:
            assert (await store.transition(await new_task(store), moves.PLACE, reserve=reservation())).ok
        stored = await new_task(store)  # the same task stored first: where CREATE queues it
        record = echo_record(store)
        refused = await store.transition(record.task_id, moves.PLACE, reserve=reservation(**ask), create=record)
        assert refused.error == refusal
        assert await r.hget(keys.task(record.task_id), "state") == "pending"
        mine, theirs = await queued(r, record.task_id), await queued(r, stored)
        assert mine[0] is not None and mine[1] == mine[0] and mine[2]
        # Queued behind the task stored before it, at the score a stored task gets.
        created_ms = int(await r.hget(keys.task(record.task_id), "created_ms"))
        assert mine[0] == transition.pending_score(0, created_ms) and mine[0] > theirs[0]
        # Listed as pending, as a stored task is, so the task lists and counts show it waiting.
        assert await r.zscore(keys.tasks_in_state(TaskState.PENDING), record.task_id) == created_ms
        # A place in the queue the scheduler places from: the next placement takes it out again.
        again = await store.transition(record.task_id, moves.PLACE, reserve=reservation())
        assert again.ok and await queued(r, record.task_id) == (None, None, True)
        assert await r.zscore(keys.tasks_in_state(TaskState.PENDING), record.task_id) is None

    run(redis_url, scenario)


def test_a_batch_of_submits_queues_only_those_whose_placement_is_refused(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        records = [echo_record(store) for _ in range(3)]
        asks = [reservation(), reservation(cpu=9000), reservation()]
        outcomes = await store.apply_many(
            [Apply(rec.task_id, Change(moves.PLACE, reserve=ask), rec) for rec, ask in zip(records, asks, strict=True)]
        )
        assert [o.ok for o in outcomes] == [True, False, True]
        assert await queued(r, records[0].task_id) == (None, None, True)
        assert (await queued(r, records[1].task_id))[0] is not None
        assert (await queued(r, records[2].task_id))[:2] == (None, None)
        listed = [await r.zscore(keys.tasks_in_state(TaskState.PENDING), rec.task_id) for rec in records]
        assert [score is not None for score in listed] == [False, True, False]

    run(redis_url, scenario)


def test_a_submit_of_an_id_already_stored_places_the_stored_task(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        record = echo_record(store)
        await store.insert([record])  # stored by an orchestrator that died before placing it
        assert (await queued(r, record.task_id))[0] is not None
        placed = await store.transition(record.task_id, moves.PLACE, reserve=reservation(), create=record)
        assert placed.ok and await queued(r, record.task_id) == (None, None, False)

    run(redis_url, scenario)


def test_then_records_a_start_and_an_end_in_one_call(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        task_id = await new_task(store)
        await store.transition(task_id, moves.PLACE, reserve=reservation())
        start = Change(moves.START, expect_worker="w1", expect_attempt=0, new_attempt=True)
        end = Change(moves.SUCCEED, expect_worker="w1", expect_attempt=1, release=True, result={"ok": True})
        both = await store.apply(task_id, start, then=end)
        assert both.ok and both.state == TaskState.SUCCEEDED and both.attempt == 1
        moved = [(e["from"], e["to"]) for _, e in await r.xrange(keys.EVENTS) if e["task"] == task_id]
        assert moved[-2:] == [("assigned", "running"), ("running", "succeeded")]
        other = await new_task(store)
        await store.transition(other, moves.CANCEL)
        before = await snapshot(r, other)
        refused = await store.apply(other, start, then=end)
        assert (refused.error, refused.detail) == (Refusal.STATE, "cancelled")
        assert await snapshot(r, other) == before

    run(redis_url, scenario)


def test_a_batch_of_start_and_end_pairs_shares_the_functions_and_each_item_sees_only_its_own_task(
    redis_url: str,
) -> None:
    # Defined once for the whole call (each item sets the call's state again), not once per part.
    for script in (transition.TRANSITION_TWICE, transition.EACH_TWICE, transition.EACH_SUBMIT):
        assert script.count("local function check_state()") == 1

    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        alice, bob, gone = await new_task(store, "alice"), await new_task(store, "bob"), await new_task(store)
        free = await r.hget(keys.worker("w1"), "slots_free")
        for task_id, owner in ((alice, "alice"), (bob, "bob")):
            await store.transition(task_id, moves.PLACE, reserve=Reservation("w1", 500, 100, [], "{}", user=owner))
        await store.transition(gone, moves.CANCEL)
        start = Change(moves.START, expect_worker="w1", expect_attempt=0, new_attempt=True)

        def end(owner: str) -> Change:
            return Change(
                moves.SUCCEED,
                expect_worker="w1",
                expect_attempt=1,
                release=True,
                result={"who": owner},
                usage={"tasks": 1.0, "wall_sec": 2.0},
                owner=owner,
            )

        ended_after = time.time()
        outcomes = await store.apply_many(
            [
                Apply(alice, start, then=end("alice")),
                Apply(gone, start, then=end("x")),
                Apply(bob, start, then=end("bob")),
            ]
        )
        assert [(o.ok, o.state, o.attempt) for o in outcomes] == [
            (True, TaskState.SUCCEEDED, 1),
            (False, None, 0),
            (True, TaskState.SUCCEEDED, 1),
        ]
        assert (outcomes[1].error, outcomes[1].detail) == (Refusal.STATE, "cancelled")
        for task_id, owner in ((alice, "alice"), (bob, "bob")):
            record = await r.hgetall(keys.task(task_id))
            assert (record["state"], record["attempts"], record["owner"]) == ("succeeded", "1", owner)
            assert json.loads(await r.get(keys.task_result(task_id)) or "") == {"who": owner}
            assert await r.zscore(keys.tasks_in_state("succeeded"), task_id) is not None
            assert await r.zscore(keys.tasks_in_state("running"), task_id) is None
        assert await r.hget(keys.task(gone), "state") == "cancelled"
        assert await r.hget(keys.worker("w1"), "slots_free") == free
        for owner in ("alice", "bob"):  # each owner's hold given back, and their own usage counted
            assert await r.hget(keys.user_usage(owner), "tasks") == "0"
            days = {transition.utc_day(ended_after), transition.utc_day(time.time())}  # midnight may fall between
            assert [await r.hget(keys.usage_day(owner, day), "wall_sec") for day in sorted(days)][-1] == "2"

    run(redis_url, scenario)


async def _script_calls(r: aioredis.Redis, command: str) -> int:
    """How often Redis has run ``command``, the calls scripts make included."""
    return int((await r.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_batch_of_ends_adds_into_each_counter_once_and_counts_as_ending_them_one_by_one(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore) -> None:
        # Alice's six ends go in one call, Bob's the same six one call each: the same usage, standing
        # and outcome counts, Alice's with one write per counter.
        base = time.time() // 86_400 * 86_400 + 3600  # 01:00 UTC today: the ends fall on one day, this month
        ends = [(base + 600 * i, {"tasks": 1.0, "wall_sec": 0.1 * (i + 1), "cpu_seconds": 1.0 / 3}) for i in range(6)]
        await WorkerRegistry(r).register(registration("w2", slots=12))
        tasks: dict[str, list[str]] = {"alice": [], "bob": []}
        for owner, ids in tasks.items():
            for _ in ends:
                task_id = await new_task(store, owner)
                placed = await store.transition(
                    task_id, moves.PLACE, reserve=Reservation("w2", 0, 0, [], "{}", user=owner)
                )
                assert placed.ok and (await store.transition(task_id, moves.START, new_attempt=True)).ok
                ids.append(task_id)

        def end(owner: str, now: float, usage: dict[str, float]) -> Change:
            return Change(moves.SUCCEED, expect_worker="w2", release=True, usage=usage, owner=owner, now=now)

        waiting = await new_task(store)  # capacity freed with a task waiting: the scheduler hears
        wake = r.pubsub()
        await wake.subscribe(keys.SCHEDULER_WAKE)
        await wake.get_message(timeout=1)
        before = await _script_calls(r, "hincrbyfloat")
        batch = [
            Apply(task_id, end("alice", now, usage)) for task_id, (now, usage) in zip(tasks["alice"], ends, strict=True)
        ]
        assert all(o.ok for o in await store.apply_many(batch))
        # tasks, wall_sec and cpu_seconds on the day, cpu_seconds (a budget counter) on the month.
        assert await _script_calls(r, "hincrbyfloat") - before == 4
        assert (await wake.get_message(timeout=1) or {}).get("data") == "succeeded"
        assert await wake.get_message(timeout=0.2) is None  # one wake-up for the whole batch
        for task_id, (now, usage) in zip(tasks["bob"], ends, strict=True):
            assert (await store.apply(task_id, end("bob", now, usage))).ok
        await wake.aclose()

        day, month = transition.utc_day(base), transition.utc_month(base)
        alice, bob = [await r.hgetall(keys.usage_day(owner, day)) for owner in ("alice", "bob")]
        assert alice.keys() == bob.keys() == {"tasks", "wall_sec", "cpu_seconds"}
        assert alice["tasks"] == bob["tasks"] == "6"
        for name in ("wall_sec", "cpu_seconds"):
            assert float(alice[name]) == pytest.approx(float(bob[name]), rel=1e-15)
        assert float(alice["wall_sec"]) == pytest.approx(2.1)
        months = [await r.hgetall(keys.usage_month(owner, month)) for owner in ("alice", "bob")]
        assert float(months[0]["cpu_seconds"]) == pytest.approx(float(months[1]["cpu_seconds"]), rel=1e-15)
        assert float(months[0]["cpu_seconds"]) == pytest.approx(2.0)
        assert await r.ttl(keys.usage_month("alice", month)) == await r.ttl(keys.usage_month("bob", month))
        # The standing decays between ends 10 minutes apart, in the same arithmetic either way.
        standing = [await r.hgetall(keys.user_fair_share(owner)) for owner in ("alice", "bob")]
        assert standing[0] == standing[1] and float(standing[0]["at"]) == base + 3000
        assert await r.zrange(keys.usage_days("alice"), 0, -1) == [day]
        assert await r.smembers(keys.USAGE_OWNERS) >= {"alice", "bob"}
        assert await r.hget(keys.TASK_OUTCOMES, "succeeded:echo") == "12"
        assert await r.hget(keys.task(waiting), "state") == "pending"

    run(redis_url, scenario)
