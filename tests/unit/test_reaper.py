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
from mloc.orchestrator.reaper import reap
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
