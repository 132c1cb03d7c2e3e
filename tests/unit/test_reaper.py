"""The reaper's word on a lost worker: a worker whose own heartbeat interval is not shorter than the
orchestrator's TTL is lost between two beats, and the warning says which setting to change."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest
import redis.asyncio as aioredis

from mloc import keys
from mloc.orchestrator.reaper import reap, redis_calm_sec
from mloc.store import TaskStore
from mloc.workers import WorkerRegistry
from tests.support.fleet import registration


@pytest.mark.parametrize(("interval", "named"), [(30.0, True), (5.0, False), (0.0, False)])
def test_a_ttl_shorter_than_the_workers_heartbeat_interval_is_named(
    redis_url: str, caplog: pytest.LogCaptureFixture, interval: float, named: bool
) -> None:
    async def scenario() -> list[str]:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        registry = WorkerRegistry(r)
        await registry.register(dataclasses.replace(registration("slow"), heartbeat_interval_sec=interval))
        await r.zadd(keys.WORKERS, {"slow": time.time() - 25})
        with caplog.at_level(logging.WARNING, logger="mloc.orchestrator.reaper"):
            report = await reap(TaskStore(r), registry, ttl_sec=20)
        await r.aclose()
        return report.lost_workers

    assert asyncio.run(scenario()) == ["slow"]
    [line] = [record.getMessage() for record in caplog.records if "lost" in record.getMessage()]
    assert line.startswith("worker slow lost: no heartbeat for 20s")
    hint = "heartbeats only every 30s (its HEARTBEAT_INTERVAL_SEC), not within this orchestrator's HEARTBEAT_TTL_SEC"
    assert (hint in line) is named
    if named:
        assert "set HEARTBEAT_TTL_SEC to at least three intervals (90s)" in line


def test_no_worker_is_declared_lost_until_redis_has_taken_heartbeats_for_a_ttl(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        registry = WorkerRegistry(r)
        await registry.register(registration("quiet"))
        await r.zadd(keys.WORKERS, {"quiet": time.time() - 25})
        with caplog.at_level(logging.INFO, logger="mloc.orchestrator.reaper"):
            # Redis came back 5 s ago: its silence may be Redis's own, so it is not counted yet.
            held = await reap(TaskStore(r), registry, ttl_sec=20, redis_calm_sec=5)
            later = await reap(TaskStore(r), registry, ttl_sec=20, redis_calm_sec=21)
        # The calm is the shorter of Redis's uptime and the time since this orchestrator last failed to reach it.
        uptime = float((await r.info("server"))["uptime_in_seconds"])
        assert await redis_calm_sec(TaskStore(r), 3.0) == pytest.approx(min(uptime, 3.0), abs=1)
        assert await redis_calm_sec(TaskStore(r), None) == pytest.approx(uptime, abs=1)
        await r.aclose()
        return held.lost_workers, later.lost_workers

    held, later = asyncio.run(scenario())
    assert (held, later) == ([], ["quiet"])
    assert any("Redis was away until 5s ago" in record.getMessage() for record in caplog.records)
