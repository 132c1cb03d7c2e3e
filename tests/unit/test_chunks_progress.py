"""A dataset task's progress in words, as `mloc show` prints it: rows done, the failed ones among them,
and the chunks not finished."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc import keys
from mloc.orchestrator.chunks import live_progress, rows_message
from mloc.records import TaskRecord
from mloc.state import TaskState
from mloc.store import TaskStore


@pytest.mark.parametrize(
    ("args", "unfinished", "expected"),
    [
        ((10, 0, 3), 0, "10 rows done in 3 chunk(s)"),
        ((4, 2, 1), 0, "4 rows done, 2 of them failed, in 1 chunk(s)"),
        ((12, 0, 3), 1, "12 rows done in 3 chunk(s); 1 cut chunk not finished"),
        ((1200, 1, 3), 2, "1,200 rows done, 1 of them failed, in 3 chunk(s); 2 cut chunks not finished"),
    ],
)
def test_rows_message(args: tuple[int, int, int], unfinished: int, expected: str) -> None:
    assert rows_message(*args, unfinished=unfinished) == expected


def test_a_running_tasks_progress_adds_its_running_chunks_rows(redis_url: str) -> None:
    async def scenario() -> dict[str, Any] | None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            chunks = {
                "c0": {"state": "succeeded", "result_summary": json.dumps({"rows": 50, "failed": 2})},
                "c1": {"state": "succeeded", "result_summary": json.dumps({"rows": 50})},
                "c2": {"state": "running", "progress": json.dumps({"step": 12, "total": 50, "unit": "rows"})},
                "c3": {"state": "cancelling", "progress": json.dumps({"step": 7, "total": 50, "unit": "rows"})},
                "c4": {"state": "pending"},
                # Downloading its model: bytes, not rows.
                "c5": {"state": "running", "progress": json.dumps({"step": 5_227_214, "total": 5_227_214})},
            }
            for child, fields in chunks.items():
                await r.hset(keys.task(child), mapping=fields)
            parent = TaskRecord.model_construct(
                task_id="parent",
                name="rows",
                owner="alice",
                task_type="inference",
                kind="InferenceTask",
                topic="tasks.inference",
                created_at=0.0,
                state=TaskState.RUNNING,
                children=list(chunks),
                progress={"step": 100, "message": "stored"},
            )
            return await live_progress(TaskStore(r), parent)
        finally:
            await r.aclose()

    progress = asyncio.run(scenario())
    assert progress is not None and (progress["step"], progress["unit"]) == (119, "rows")
    assert progress["message"] == "100 rows done, 2 of them failed, in 2 chunk(s); 19 more in 3 running chunk(s)"
