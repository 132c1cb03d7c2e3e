"""Usage reports read ended days once and the open days (today, yesterday) on every request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from mloc import keys
from mloc.service import Orchestrator
from mloc.settings import Settings


def test_reports_sum_every_day_and_see_new_usage_on_open_days(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        today = datetime.now(UTC).date()
        days = [today - timedelta(days=i) for i in range(10)]
        for user, scale in (("alice", 1.0), ("bob", 2.0)):
            await r.sadd(keys.USAGE_OWNERS, user)
            for i, day in enumerate(days):
                if user == "bob" and i % 3 == 0:
                    continue  # days without usage are left out of the series
                await r.hset(
                    keys.usage_day(user, day.isoformat()), mapping={"tasks": 1, "gpu_seconds": scale * (i + 1)}
                )
        start, end = days[-1], today

        async def report() -> dict[str, dict]:
            body = await orch.stats(None, start, end)
            return {entry["user"]: entry for entry in body["users"]}

        first = await report()
        assert first["alice"]["totals"] == {"tasks": 10.0, "gpu_seconds": 55.0}
        assert [d["date"] for d in first["alice"]["days"]] == [d.isoformat() for d in reversed(days)]
        bob_days = [i for i in range(10) if i % 3]
        assert first["bob"]["totals"] == {"tasks": len(bob_days), "gpu_seconds": sum(2.0 * (i + 1) for i in bob_days)}
        assert len(first["bob"]["days"]) == len(bob_days)
        # Work that ends now (and a late finish counted on yesterday) shows at once.
        await r.hincrbyfloat(keys.usage_day("alice", today.isoformat()), "gpu_seconds", 100)
        await r.hincrbyfloat(keys.usage_day("alice", days[1].isoformat()), "tasks", 1)
        await r.hset(keys.usage_day("carol", today.isoformat()), mapping={"tasks": 3})
        await r.sadd(keys.USAGE_OWNERS, "carol")
        second = await report()
        assert second["alice"]["totals"] == {"tasks": 11.0, "gpu_seconds": 155.0}
        assert second["carol"]["totals"] == {"tasks": 3.0} and len(second["carol"]["days"]) == 1
        assert second["bob"] == first["bob"]
        # One user's report, a range of ended days only, and a range in the future.
        only = (await orch.stats("bob", days[-1], days[5]))["users"]
        assert [entry["user"] for entry in only] == ["bob"]
        assert only[0]["totals"]["gpu_seconds"] == sum(2.0 * (i + 1) for i in bob_days if i >= 5)
        ahead = (await orch.stats("alice", today, today + timedelta(days=3)))["users"][0]
        assert ahead["totals"] == {"tasks": 1.0, "gpu_seconds": 101.0}
        await r.aclose()

    asyncio.run(scenario())
