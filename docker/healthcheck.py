#!/usr/bin/env python3
"""Health check for the MLOC images: Docker HEALTHCHECK and Kubernetes exec probes.

    mloc-healthcheck orchestrator   GET http://<MLOC_HOST>:<MLOC_PORT>/healthz must answer 2xx
    mloc-healthcheck readyz         GET .../readyz must answer 2xx (the orchestrator reaches Redis)
    mloc-healthcheck worker         Redis at REDIS_URL must answer PING (a worker's only channel), and this
                                    worker's last heartbeat there be recent (its WORKER_ID, else the
                                    newest worker registered from this host): a worker whose loop is
                                    stuck stops heartbeating while its Redis still answers
    mloc-healthcheck worker-live    for a liveness probe: unhealthy only when Redis answers and the heartbeat
                                    is stale; a Redis outage is not the worker's doing, and restarting it
                                    then would only drop the tasks it runs

Exit status 0 when healthy, 1 when not, with one line on stderr saying why. Settings are read the way
MLOC reads them (both seeds' spellings: MLOC_PORT / PORT, MLOC_REDIS_URL / REDIS_URL).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_SEC = float(os.environ.get("MLOC_HEALTHCHECK_TIMEOUT_SEC", "4"))


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return default


def _http_ok(path: str) -> tuple[bool, str]:
    host = _env("MLOC_HOST", default="0.0.0.0") or "0.0.0.0"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = _env("MLOC_PORT", "PORT", default="8000")
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SEC) as response:
            return 200 <= response.status < 300, f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered {exc.code}"
    except OSError as exc:
        return False, f"{url} unreachable: {exc}"


def _worker_ok(*, redis_required: bool = True) -> tuple[bool, str]:
    url = _env("MLOC_REDIS_URL", "REDIS_URL")
    if not url:
        return False, "REDIS_URL is not set: a worker in a container needs a shared Redis"
    try:
        client = _redis_client(url)
        client.ping()
    except Exception as exc:  # any failure is "unhealthy", with the reason (password never printed)
        return not redis_required, f"Redis PING failed: {type(exc).__name__}: {exc}"
    try:
        from mloc import keys
    except ImportError:
        return True, "Redis answered PING"  # outside the images: the worker's records cannot be named
    try:
        return _heartbeat_ok(client, keys)
    except Exception as exc:
        return False, f"reading the worker's heartbeat failed: {type(exc).__name__}: {exc}"


def _heartbeat_ok(client: Any, keys: Any) -> tuple[bool, str]:
    """Whether this worker heartbeats: within three of its intervals, with some slack for a busy host."""
    interval = float(_env("HEARTBEAT_INTERVAL_SEC", default="30") or "30")
    allowed = 3 * interval + 5
    worker_id = _env("WORKER_ID", "MLOC_WORKER_ID")
    if worker_id:
        ids = [worker_id]
    else:  # a worker without WORKER_ID is named after its host, with a suffix new at each start
        prefix = socket.gethostname() + "-"
        members = [m.decode() if isinstance(m, bytes) else str(m) for m in client.zrange(keys.WORKERS, 0, -1)]
        ids = [member for member in members if member.startswith(prefix)]
    beats = {worker: client.zscore(keys.WORKERS, worker) for worker in ids}
    live = {worker: beat for worker, beat in beats.items() if beat is not None}
    if not live:
        if worker_id:
            return False, f"worker {worker_id} has not registered on Redis (yet)"
        return False, f"no worker of host {socket.gethostname()} has registered on Redis (yet)"
    worker, beat = max(live.items(), key=lambda item: item[1])
    age = time.time() - float(beat)
    if age > allowed:
        return False, (
            f"worker {worker} last heartbeat {age:.0f}s ago, more than {allowed:g}s (3 x HEARTBEAT_INTERVAL_SEC "
            f"{interval:g}s + 5): it is stuck, or cannot reach Redis"
        )
    return True, f"Redis answered PING; worker {worker} heartbeat {age:.0f}s ago"


def _redis_client(url: str) -> Any:
    """The client MLOC itself would use (TLS settings, Sentinel), or a plain one outside the images."""
    try:
        from mloc.connection import sync_client
    except ImportError:
        import redis

        return redis.Redis.from_url(url, socket_timeout=TIMEOUT_SEC, socket_connect_timeout=TIMEOUT_SEC)
    client = sync_client(url)
    client.connection_pool.connection_kwargs.update(socket_timeout=TIMEOUT_SEC, socket_connect_timeout=TIMEOUT_SEC)
    return client


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else _env("MLOC_NODE_TYPE", default="orchestrator") or ""
    mode = mode.lower()
    if mode in ("orchestrator", "healthz"):
        ok, why = _http_ok("/healthz")
    elif mode in ("readyz", "ready"):
        ok, why = _http_ok("/readyz")
    elif mode == "worker":
        ok, why = _worker_ok()
    elif mode == "worker-live":
        ok, why = _worker_ok(redis_required=False)
    else:
        print(f"usage: {argv[0]} orchestrator|readyz|worker|worker-live (got {mode!r})", file=sys.stderr)
        return 2
    print(("healthy: " if ok else "unhealthy: ") + why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
