"""The echo executor run directly, as a worker runs it in a thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from mloc.errors import TaskCancelled
from mloc.executors.base import RunContext
from mloc.executors.echo import EchoExecutor
from mloc.spec import validate


def context(tmp_path: Path, events: list[dict[str, Any]], **hyperparameters: Any) -> RunContext:
    document = validate({"taskType": "echo", "payload": {"n": 1}, "hyperparameters": hyperparameters})
    return RunContext(
        task_id="t1",
        attempt=1,
        owner="alice",
        document=document,
        out_dir=tmp_path / "out",
        models_dir=tmp_path / "models",
        worker_id="w1",
        emit=events.append,
    )


def test_a_sleeping_echo_reports_each_step_and_returns_its_payload(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    result = EchoExecutor().run(context(tmp_path, events, sleep_sec=0.2, steps=2))
    assert result["ok"] and result["payload"] == {"n": 1}
    assert [(e["step"], e["total"]) for e in events if e["ev"] == "progress"] == [(1, 2), (2, 2)]
    assert [e["message"] for e in events if e["ev"] == "log"] == ["step 1/2", "step 2/2"]


def test_an_echo_cancelled_mid_step_reports_no_step_it_did_not_finish(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    ctx = context(tmp_path, events, sleep_sec=30, steps=1)
    threading.Timer(0.1, ctx.cancel_event.set).start()
    with pytest.raises(TaskCancelled):
        EchoExecutor().run(ctx)
    assert [e for e in events if e["ev"] in ("progress", "log")] == []
