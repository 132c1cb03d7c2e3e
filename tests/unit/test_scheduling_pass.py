"""Placements made many at a time, over a real Redis: a scheduling pass
(mloc.orchestrator.scheduler.Scheduler.schedule_pending) and a bulk submit (Orchestrator.submit_many)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.orchestrator import scheduler
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.settings import Settings
from mloc.spec import validate
from tests.support.fleet import registration

ADMIN = Principal("admin", admin=True)


def test_a_pass_hands_its_first_placements_to_the_workers_before_choosing_the_rest(redis_url: str) -> None:
    """Freed workers start on a long pass's first tasks while it goes on: its placements are made
    COMMIT_EVERY at a time, in the order it takes the tasks, each batch as soon as it is chosen."""
    waiting = 2 * scheduler.COMMIT_EVERY + 5

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        # Submitted while no worker runs: they wait, in submission order (the order a pass takes them).
        order = [(await orch.submit(validate({"taskType": "echo"}), ADMIN))["task_id"] for _ in range(waiting)]
        await orch.registry.register(registration("w1", slots=waiting))
        stream = keys.worker_stream("w1")
        # What Redis ran while the pass did, in its order: the spec a placement reads for each task,
        # and the assignments the placements wrote.
        seen: list[tuple[str, str]] = []
        async with r.monitor() as monitor:
            placed = await orch.scheduler.schedule_pending()
            async for entry in monitor.listen():
                name, *args = entry["command"].split()
                if name == "HGET" and args[1] == "spec":
                    seen.append(("read", args[0].removeprefix(keys.task(""))))
                elif name == "XADD" and args[0] == stream:
                    seen.append(("assigned", args[args.index("task") + 1]))
                if sum(kind == "assigned" for kind, _ in seen) == waiting:
                    break
        assert placed == waiting
        assigned = [task_id for kind, task_id in seen if kind == "assigned"]
        assert assigned == order
        # Each batch is read and assigned before the next is read: the first reach the worker early.
        batches = [order[i : i + scheduler.COMMIT_EVERY] for i in range(0, waiting, scheduler.COMMIT_EVERY)]
        expected = [(kind, task_id) for batch in batches for kind in ("read", "assigned") for task_id in batch]
        assert seen == expected
        entries = await r.xrange(stream)
        assert [fields["task"] for _, fields in entries] == order
        await r.aclose()

    asyncio.run(scenario())


def test_a_bulk_submit_places_its_tasks_where_room_has_just_freed(redis_url: str) -> None:
    """The worker's room is read as the bulk is placed: tasks that ended a moment before it was sent
    do not leave it waiting, told that no worker has room, until the next pass."""

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(registration("w1", slots=2))
        first = await orch.submit_many([validate({"taskType": "echo"}) for _ in range(2)], ADMIN)
        assert [answer["worker_id"] for answer in first] == ["w1", "w1"]
        for answer in first:  # both run and end on w1, which frees its two slots
            task_id = answer["task_id"]
            assert (await orch.store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)).ok
            assert (await orch.store.transition(task_id, moves.SUCCEED, expect_worker="w1", release=True)).ok
        second = await orch.submit_many([validate({"taskType": "echo"}) for _ in range(3)], ADMIN)
        assert [answer["worker_id"] for answer in second] == ["w1", "w1", None]
        assert second[2]["pending_reason"]
        await r.aclose()

    asyncio.run(scenario())


def test_a_wake_up_pass_with_no_free_slot_reads_no_waiting_task(redis_url: str) -> None:
    """A burst of ends wakes one pass more than the room it freed needs: finding every slot taken,
    it returns at once, without reading the queues; the next room freed is filled as before."""

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(registration("w1", slots=1))
        running, *waiting = [(await orch.submit(validate({"taskType": "echo"}), ADMIN))["task_id"] for _ in range(3)]
        assert await r.hget(keys.task(running), "state") == "assigned"
        commands: list[str] = []
        async with r.monitor() as monitor:
            assert await orch.scheduler.schedule_pending(quick=True) == 0
            await r.set("probe:end", "1")  # the last command of the pass, for the monitor to stop at
            async for entry in monitor.listen():
                if entry["command"].startswith("SET probe:end"):
                    break
                commands.append(entry["command"])
        # Due retries are still promoted; the owner's queue is not read.
        assert not [c for c in commands if keys.pending_of("admin") in c], commands
        assert (await orch.store.transition(running, moves.START, expect_worker="w1", new_attempt=True)).ok
        assert (await orch.store.transition(running, moves.SUCCEED, expect_worker="w1", release=True)).ok
        assert await orch.scheduler.schedule_pending(quick=True) == 1
        assert [await r.hget(keys.task(task_id), "state") for task_id in waiting] == ["assigned", "pending"]
        await r.aclose()

    asyncio.run(scenario())
