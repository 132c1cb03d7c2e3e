"""docker/healthcheck.py (the images' mloc-healthcheck), run against servers on the loopback only:
a tiny HTTP server for the orchestrator's /healthz and /readyz, a tiny RESP server for Redis.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from mloc.localcluster import LocalCluster

from .conftest import DOCKER_DIR, clean_env, run

HEALTHCHECK = DOCKER_DIR / "healthcheck.py"


class _Health(BaseHTTPRequestHandler):
    answers = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:
        self.send_response(self.answers.get(self.path, 404))
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


class _Resp(socketserver.StreamRequestHandler):
    """Answers +PONG to PING and +OK to anything else (AUTH, CLIENT SETINFO, ...)."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            if not line.startswith(b"*"):
                continue
            words = []
            for _ in range(int(line[1:])):
                size = int(self.rfile.readline()[1:])
                words.append(self.rfile.read(size + 2)[:-2].decode())
            self.wfile.write(b"+PONG\r\n" if words[0].upper() == "PING" else b"+OK\r\n")


def _serve(server: socketserver.TCPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_port() -> Iterator[int]:
    yield from _serve(HTTPServer(("127.0.0.1", 0), _Health))


@pytest.fixture
def redis_port() -> Iterator[int]:
    socketserver.ThreadingTCPServer.daemon_threads = True
    yield from _serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Resp))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(tmp_path: Path, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, str(HEALTHCHECK), mode],
        env=clean_env(tmp_path, MLOC_HEALTHCHECK_TIMEOUT_SEC="2", **env),
    )


def test_orchestrator_healthy_when_healthz_answers_200(tmp_path: Path, http_port: int) -> None:
    result = _check(tmp_path, "orchestrator", MLOC_HOST="0.0.0.0", MLOC_PORT=str(http_port))
    assert result.returncode == 0, result.stderr
    assert "/healthz answered 200" in result.stderr


def test_readyz_failure_is_unhealthy(tmp_path: Path, http_port: int) -> None:
    result = _check(tmp_path, "readyz", PORT=str(http_port))
    assert result.returncode == 1 and "503" in result.stderr, result.stderr


def test_orchestrator_down_is_unhealthy(tmp_path: Path) -> None:
    result = _check(tmp_path, "orchestrator", MLOC_PORT=str(_free_port()))
    assert result.returncode == 1 and "unreachable" in result.stderr, result.stderr


def test_a_worker_is_healthy_while_it_heartbeats_and_unhealthy_once_it_stops(
    tmp_path: Path, make_cluster: Callable[..., LocalCluster], redis_url: str
) -> None:
    cluster = make_cluster(1, env={"HEARTBEAT_INTERVAL_SEC": "1", "HEARTBEAT_TTL_SEC": "60"})
    url = redis_url.replace("redis://", "redis://:s3cret-pass@") if "@" not in redis_url else redis_url
    env = {"REDIS_URL": redis_url, "HEARTBEAT_INTERVAL_SEC": "1", "WORKER_ID": "local-1"}
    healthy = _check(tmp_path, "worker", **env)
    assert healthy.returncode == 0 and "worker local-1 heartbeat" in healthy.stderr, healthy.stderr
    # Without WORKER_ID it looks for a worker named after this host, as a worker without one is.
    unnamed = _check(tmp_path, "worker", REDIS_URL=redis_url, HEARTBEAT_INTERVAL_SEC="1")
    assert unnamed.returncode == 1 and f"no worker of host {socket.gethostname()} has registered" in unnamed.stderr
    # A worker whose process is stuck stops heartbeating while Redis still answers: unhealthy, saying so.
    worker = cluster.worker_procs["local-1"]
    worker.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while (stuck := _check(tmp_path, "worker", **env)).returncode == 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert stuck.returncode == 1, stuck.stderr
        assert "worker local-1 last heartbeat" in stuck.stderr and "it is stuck, or cannot reach Redis" in stuck.stderr
        assert _check(tmp_path, "worker-live", **env).returncode == 1
    finally:
        worker.send_signal(signal.SIGCONT)
    assert "s3cret-pass" not in _check(tmp_path, "worker", REDIS_URL=url).stderr
    # Redis away: the worker is not live-checked into a restart that would drop its tasks, but is not healthy.
    away = {**env, "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    assert _check(tmp_path, "worker", **away).returncode == 1
    live = _check(tmp_path, "worker-live", **away)
    assert live.returncode == 0 and "Redis PING failed" in live.stderr, live.stderr


def test_worker_unhealthy_without_redis(tmp_path: Path) -> None:
    down = _check(tmp_path, "worker", MLOC_REDIS_URL=f"redis://:s3cret-pass@127.0.0.1:{_free_port()}/0")
    assert down.returncode == 1 and "PING failed" in down.stderr, down.stderr
    assert "s3cret-pass" not in down.stderr
    unset = _check(tmp_path, "worker")
    assert unset.returncode == 1 and "REDIS_URL" in unset.stderr


def test_unknown_mode_is_a_usage_error(tmp_path: Path) -> None:
    assert _check(tmp_path, "bogus").returncode == 2
