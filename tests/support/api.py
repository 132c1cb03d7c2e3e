"""Helpers for tests that drive the orchestrator over HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx


def wait_for(http: httpx.Client, task_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    """Poll the task until it is in one of ``states``; its record then."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/tasks/{task_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {states}: {body}")
