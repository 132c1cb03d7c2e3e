"""The time a running task has left, as its worker tells it from the executor's progress: the pace of
this run's own work, so a resumed run is not credited with the steps it began at."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc import keys
from mloc.worker.reporter import Reporter


def told(redis_url: str, events: list[dict[str, Any]], started: float) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            reporter = Reporter(client, "eta-task", started)
            for event in events:
                reporter.handle({"ev": "progress", "message": None, **event})
            await reporter.flush()
            await reporter.close()
            return json.loads(await client.hget(keys.task("eta-task"), "progress") or "{}")
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_fresh_run_is_told_from_its_start(redis_url: str) -> None:
    now = time.time()
    progress = told(redis_url, [{"step": 25, "total": 100, "ts": now}], started=now - 10)
    # 25 steps in 10 s: 75 more take about 30 s.
    assert progress["eta_sec"] == pytest.approx(30, abs=0.5), progress
    assert progress["elapsed_sec"] == pytest.approx(10, abs=0.5)


def test_a_resumed_run_is_told_from_the_step_it_continued_at(redis_url: str) -> None:
    now = time.time()
    events: list[dict[str, Any]] = [
        {"step": 0, "total": None, "message": "loading the model", "ts": now - 20},
        # Loaded after 12 s: it continues at step 1,400 of 3,000, and has done 100 more steps in 8 s.
        {"step": 1400, "total": 3000, "since": 1400, "ts": now - 8},
        {"step": 1500, "total": 3000, "ts": now},
    ]
    progress = told(redis_url, events, started=now - 20)
    # 1,500 left at 12.5 steps a second: 120 s (not 20 s, as 1,500 steps in 20 s would say).
    assert progress["eta_sec"] == pytest.approx(120, abs=2), progress
    assert progress["step"] == 1500 and progress["elapsed_sec"] == pytest.approx(20, abs=0.5)
