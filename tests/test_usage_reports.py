"""Usage reports: any range of UTC days, read from the days with usage only; ended days are read once,
the open ones (yesterday, today, later) on every request; rows per day, ISO week or month; the
all-users report comes a page at a time.

Every test names its own "today" (derived from the clock, then held fixed), so none depends on the
date or the time of day it runs at."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta

import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.usage import Grouping
from mloc.settings import Settings
from mloc.state import TaskState
from mloc.store import TaskStore
from tests.support.fleet import echo_record

# Ends a task that is still waiting: usage is recorded as a worker records it, without a worker.
FAIL_WAITING = moves.Move("fail_waiting", TaskState.FAILED, frozenset({TaskState.PENDING}))


async def spend(store: TaskStore, owner: str, day: date, **counters: float) -> None:
    """Record usage the way a worker does: a task ends at noon (UTC) of ``day`` with these counters."""
    record = echo_record(store, owner)
    await store.insert([record])
    noon = datetime.combine(day, time(12), UTC).timestamp()
    ended = await store.transition(record.task_id, FAIL_WAITING, usage=counters, owner=owner, now=noon)
    assert ended.ok


def utc_today() -> date:
    return datetime.now(UTC).date()


def test_reports_sum_every_day_and_see_new_usage_on_open_days(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        today = utc_today()
        days = [today - timedelta(days=i) for i in range(10)]
        for user, scale in (("alice", 1.0), ("bob", 2.0)):
            for i, day in enumerate(days):
                if user == "bob" and i % 3 == 0:
                    continue  # days without usage are left out of the series
                await spend(orch.store, user, day, tasks=1, gpu_seconds=scale * (i + 1))
        start, end = days[-1], today

        async def report() -> dict[str, dict]:
            body = await orch.stats(None, start, end, today=today)
            return {entry["user"]: entry for entry in body["users"]}

        first = await report()
        assert first["alice"]["totals"] == {"tasks": 10.0, "gpu_seconds": 55.0}
        assert [d["date"] for d in first["alice"]["days"]] == [d.isoformat() for d in reversed(days)]
        bob_days = [i for i in range(10) if i % 3]
        assert first["bob"]["totals"] == {"tasks": len(bob_days), "gpu_seconds": sum(2.0 * (i + 1) for i in bob_days)}
        assert len(first["bob"]["days"]) == len(bob_days)
        # Work that ends now (and a late finish counted on yesterday) shows at once.
        await spend(orch.store, "alice", today, gpu_seconds=100)
        await spend(orch.store, "alice", days[1], tasks=1)
        await spend(orch.store, "carol", today, tasks=3)
        second = await report()
        assert second["alice"]["totals"] == {"tasks": 11.0, "gpu_seconds": 155.0}
        assert second["carol"]["totals"] == {"tasks": 3.0} and len(second["carol"]["days"]) == 1
        assert second["bob"] == first["bob"]
        # One user's report, a range of ended days only, and a range in the future.
        only = (await orch.stats("bob", days[-1], days[5], today=today))["users"]
        assert [entry["user"] for entry in only] == ["bob"]
        assert only[0]["totals"]["gpu_seconds"] == sum(2.0 * (i + 1) for i in bob_days if i >= 5)
        ahead = (await orch.stats("alice", today, today + timedelta(days=3), today=today))["users"][0]
        assert ahead["totals"] == {"tasks": 1.0, "gpu_seconds": 101.0}
        await r.aclose()

    asyncio.run(scenario())


def test_a_ten_year_range_reads_only_the_days_with_usage(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        today = utc_today()
        busy = [today - timedelta(days=3650), today - timedelta(days=400), today]
        for day in busy:
            await spend(orch.store, "dana", day, tasks=1, wall_sec=2.5)
        await r.config_resetstat()
        body = await orch.stats("dana", today - timedelta(days=3652), None, today=today)
        entry = body["users"][0]
        assert entry["totals"] == {"tasks": 3.0, "wall_sec": 7.5}
        assert [row["date"] for row in entry["days"]] == [day.isoformat() for day in busy]
        # One hash read per day with usage, not one per calendar day.
        calls = await r.info("commandstats")
        assert calls["cmdstat_hgetall"]["calls"] == len(busy), calls
        # Ended days are kept: a second report reads only today's.
        await r.config_resetstat()
        again = await orch.stats("dana", today - timedelta(days=3652), None, today=today)
        assert again["users"] == body["users"]
        assert (await r.info("commandstats"))["cmdstat_hgetall"]["calls"] == 1
        # Ten years ahead as well: the end of the range costs nothing either.
        far = await orch.stats("dana", busy[0], today + timedelta(days=3650), today=today)
        assert far["users"][0]["totals"]["tasks"] == 3.0
        await r.aclose()

    asyncio.run(scenario())


def test_rows_per_iso_week_month_or_none(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        # Around a turn of the year where the ISO year and the calendar year disagree: 2026 has 53
        # ISO weeks, and 2027-01-01..03 still belong to 2026-W53.
        days = [date(2026, 12, 27), date(2026, 12, 28), date(2027, 1, 1), date(2027, 1, 3), date(2027, 1, 4)]
        for day in days:
            await spend(orch.store, "erin", day, tasks=1, gpu_seconds=10)
        today = date(2027, 2, 1)

        async def rows(grouping: Grouping) -> dict:
            body = await orch.stats("erin", days[0], days[-1], group_by=grouping, today=today)
            assert body["group_by"] == grouping.value
            return dict(body["users"][0])

        weeks = await rows(Grouping.WEEK)
        assert [(p["period"], p["tasks"]) for p in weeks["periods"]] == [
            ("2026-W52", 1.0),
            ("2026-W53", 3.0),
            ("2027-W01", 1.0),
        ]
        months = await rows(Grouping.MONTH)
        assert [(p["period"], p["gpu_seconds"]) for p in months["periods"]] == [("2026-12", 20.0), ("2027-01", 30.0)]
        total = await rows(Grouping.TOTAL)
        assert total == {"user": "erin", "totals": {"tasks": 5.0, "gpu_seconds": 50.0}}
        by_day = await rows(Grouping.DAY)
        assert [row["date"] for row in by_day["days"]] == [day.isoformat() for day in days]
        assert weeks["totals"] == months["totals"] == total["totals"] == by_day["totals"]
        await r.aclose()

    asyncio.run(scenario())


def test_a_repeated_report_adds_the_open_days_to_the_ended_ones_it_summed(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        today = date(2030, 5, 15)  # yesterday, today and the ended days before them share a month
        for back in (20, 3, 2):
            await spend(orch.store, "gina", today - timedelta(days=back), tasks=1)
        start = today - timedelta(days=60)

        async def months() -> list[tuple[str, float]]:
            body = await orch.stats("gina", start, today, group_by=Grouping.MONTH, today=today)
            return [(p["period"], p["tasks"]) for p in body["users"][0]["periods"]]

        assert await months() == [("2030-04", 1.0), ("2030-05", 2.0)]
        await spend(orch.store, "gina", today, tasks=1)
        await spend(orch.store, "gina", today - timedelta(days=1), tasks=1)
        assert await months() == [("2030-04", 1.0), ("2030-05", 4.0)]
        assert await months() == [("2030-04", 1.0), ("2030-05", 4.0)]  # the summed ended days are unchanged
        days = await orch.stats("gina", start, today, today=today)
        assert [row["date"] for row in days["users"][0]["days"]] == [
            (today - timedelta(days=back)).isoformat() for back in (20, 3, 2, 1, 0)
        ]
        assert days["users"][0]["totals"] == {"tasks": 5.0}
        await r.aclose()

    asyncio.run(scenario())


def test_the_all_users_report_comes_a_page_at_a_time(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        today = utc_today()
        names = [f"user{i}" for i in range(5)]
        for i, name in enumerate(names):
            for back in range(i + 1):  # user<i> has usage on i + 1 days
                await spend(orch.store, name, today - timedelta(days=back), tasks=1)
        start = today - timedelta(days=10)

        seen: list[str] = []
        after = None
        while True:
            body = await orch.stats(None, start, today, after=after, limit=2, today=today)
            seen += [entry["user"] for entry in body["users"]]
            assert len(body["users"]) <= 2
            if not body["truncated"]:
                assert body["next_after"] is None
                break
            after = body["next_after"]
            assert after == body["users"][-1]["user"]
        assert seen == names
        # The rows cap: users are added whole until the next would pass it (at least one user).
        capped = await orch.stats(None, start, today, limit=5, max_rows=6, today=today)
        assert [entry["user"] for entry in capped["users"]] == ["user0", "user1", "user2"]
        assert capped["truncated"] and capped["next_after"] == "user2"
        rest = await orch.stats(None, start, today, after="user2", limit=5, max_rows=6, today=today)
        assert [entry["user"] for entry in rest["users"]] == ["user3"]
        last = await orch.stats(None, start, today, after="user3", limit=5, max_rows=1, today=today)
        assert [entry["user"] for entry in last["users"]] == ["user4"] and not last["truncated"]
        await r.aclose()

    asyncio.run(scenario())


def test_usage_recorded_before_the_day_indexes_existed_is_indexed_once(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        today = utc_today()
        old = today - timedelta(days=700)
        # As an MLOC without day indexes left it: the daily hashes and the set of owners only.
        for day in (old, today):
            await r.hset(keys.usage_day("frank", day.isoformat()), mapping={"tasks": 2})
        await r.sadd(keys.USAGE_OWNERS, "frank")
        orch = Orchestrator(r, Settings())
        body = await orch.stats("frank", old, today, today=today)
        assert body["users"][0]["totals"] == {"tasks": 4.0}
        assert await r.zrange(keys.usage_days("frank"), 0, -1) == [old.isoformat(), today.isoformat()]
        assert await r.exists(keys.USAGE_DAYS_BUILT)
        await r.aclose()

    asyncio.run(scenario())
