#!/usr/bin/env python3
"""Health check for the MLOC images: Docker HEALTHCHECK and Kubernetes exec probes.

    mloc-healthcheck orchestrator   GET http://<MLOC_HOST>:<MLOC_PORT>/healthz must answer 2xx
    mloc-healthcheck readyz         GET .../readyz must answer 2xx (the orchestrator reaches Redis)
    mloc-healthcheck worker         Redis at REDIS_URL must answer PING (a worker's only channel)

Exit status 0 when healthy, 1 when not, with one line on stderr saying why. Settings are read the way
MLOC reads them (both seeds' spellings: MLOC_PORT / PORT, MLOC_REDIS_URL / REDIS_URL).
"""

from __future__ import annotations

import os
import sys
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


def _redis_ok() -> tuple[bool, str]:
    url = _env("MLOC_REDIS_URL", "REDIS_URL")
    if not url:
        return False, "REDIS_URL is not set: a worker in a container needs a shared Redis"
    try:
        client = _redis_client(url)
        client.ping()
    except Exception as exc:  # any failure is "unhealthy", with the reason (password never printed)
        return False, f"Redis PING failed: {type(exc).__name__}: {exc}"
    return True, "Redis answered PING"


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
        ok, why = _redis_ok()
    else:
        print(f"usage: {argv[0]} orchestrator|readyz|worker (got {mode!r})", file=sys.stderr)
        return 2
    print(("healthy: " if ok else "unhealthy: ") + why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
