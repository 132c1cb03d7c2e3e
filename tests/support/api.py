"""Helpers for tests that drive the orchestrator over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from mloc.client import Client


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


def wait_until(
    client: Client, task_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    """Poll the task through the client until ``predicate`` holds for its record; the record then."""
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = client.task(task_id)
        if predicate(record):
            return record
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not get there in {timeout}s: {record}")
