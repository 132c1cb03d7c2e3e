"""A small HTTP client for the orchestrator API (used by the CLI; usable as a Python SDK)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from mloc.errors import MlocError

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(MlocError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("message") or body), details=body.get("details"))
        self.status_code = status
        self.code = str(body.get("error", "error"))


class Client:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise MlocError(
                f"cannot reach the orchestrator at {self.http.base_url}: {exc}; is it running? (MLOC_API_URL)"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:500]}
        if response.status_code >= 400:
            raise ApiError(response.status_code, body if isinstance(body, dict) else {"message": str(body)})
        return body

    def submit(self, task: str | bytes | Path, *, dry_run: bool = False) -> dict[str, Any]:
        data = Path(task).read_bytes() if isinstance(task, Path) else task
        params = {"dry_run": "true"} if dry_run else {}
        return self._call("POST", "/api/v1/tasks", content=data, params=params, headers={"Content-Type": "text/yaml"})

    def submit_bulk(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/tasks/bulk", json={"tasks": tasks})

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/tasks/{task_id}")

    def result(self, task_id: str) -> Any:
        return self._call("GET", f"/api/v1/tasks/{task_id}/result")

    def artifacts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's result files: [{"path", "size"}, ...]."""
        return list(self._call("GET", f"/api/v1/tasks/{task_id}/artifacts")["items"])

    def artifact(self, task_id: str, path: str) -> Iterator[bytes]:
        """One result file, streamed in blocks."""
        try:
            with self.http.stream("GET", f"/api/v1/tasks/{task_id}/artifacts/{quote(path)}") as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        body = response.json()
                    except ValueError:
                        body = {"message": response.text[:500]}
                    raise ApiError(response.status_code, body if isinstance(body, dict) else {"message": str(body)})
                yield from response.iter_bytes()
        except httpx.ConnectError as exc:
            raise MlocError(
                f"cannot reach the orchestrator at {self.http.base_url}: {exc}; is it running? (MLOC_API_URL)"
            ) from exc

    def tasks(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/tasks", params={k: v for k, v in params.items() if v is not None})

    def metrics(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/tasks/{task_id}/metrics")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/tasks/{task_id}/cancel")

    def logs(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/tasks/{task_id}/logs")

    def follow_logs(self, task_id: str) -> Iterator[str]:
        with self.http.stream("GET", f"/api/v1/tasks/{task_id}/logs", params={"follow": "true"}, timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield line[6:]

    def workers(self) -> dict[str, Any]:
        return self._call("GET", "/workers")

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self._call("GET", f"/workers/{worker_id}")

    def stats(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/stats", params={k: v for k, v in params.items() if v is not None})

    def cleanup(self) -> dict[str, Any]:
        return self._call("POST", "/admin/cleanup")

    def add_user(self, name: str) -> dict[str, Any]:
        return self._call("POST", "/admin/users", json={"name": name})

    def users(self) -> dict[str, Any]:
        return self._call("GET", "/admin/users")

    def remove_user(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/users/{name}")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the task ends; returns its final record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            record = self.task(task_id)
            if on_update is not None:
                on_update(record)
            if record["state"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise MlocError(f"task {task_id} is still {record['state']} after {timeout}s")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
