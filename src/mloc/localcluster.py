"""Redis + orchestrator + workers as real processes on this machine: `mloc up`, `mloc run`, tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from mloc import embedded, proctree
from mloc.errors import ConfigError
from mloc.orchestrator.server import check_port
from mloc.records import WorkerStatus

# Seconds the orchestrator gets to stop (it is quick but for open connections) before it is killed.
STOP_WAIT_SEC = 2.0


@dataclass
class LocalCluster:
    home: Path
    port: int = 0
    workers: int = 1
    redis_url: str | None = None
    topics: str = "tasks.*"
    results_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    worker_env: list[Mapping[str, str]] = field(default_factory=list)
    log_dir: Path | None = None
    quiet: bool = True
    # Each process in a process group of its own: what a terminal sends its foreground job (Ctrl-C, a
    # hang-up when it closes) reaches the caller alone, which then stops them in order (workers drain).
    own_groups: bool = False
    redis: embedded.EmbeddedRedis | None = None
    orchestrator: subprocess.Popen[bytes] | None = None
    worker_procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _base_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MLOC_", "REDIS_URL", "WORKER_", "TASK_TOPICS"))
        }
        # Output is captured (or shown) here, so the orchestrator writes no orchestrator.log of its own.
        env.update({"MLOC_HOME": str(self.home), "REDIS_URL": self.redis_url or "", "PYTHONUNBUFFERED": "1"})
        env["MLOC_LOG_FILE"] = ""
        # One host, one results folder: the orchestrator writes replica groups' merged results there
        # and serves every task's files from it.
        env["RESULTS_DIR"] = str(self.results_dir or self.home / "results")
        env.update(self.env)
        return env

    def _output(self, name: str) -> IO[bytes] | int | None:
        if self.log_dir is None:
            return subprocess.DEVNULL if self.quiet else None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        output = self._output(name)
        try:
            group = 0 if self.own_groups else None
            return subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, process_group=group)
        finally:
            if not isinstance(output, int | None):
                output.close()  # the child holds its own copy

    def start_redis(self) -> str:
        """The Redis URL, after starting the embedded server when none was given; `start` calls it too."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.redis_url is None:
            self.redis = embedded.start(self.home)
            self.redis_url = self.redis.url
        return self.redis_url

    def check_port(self) -> None:
        """ConfigError when the orchestrator's port is taken: said before anything starts, as another
        orchestrator there would answer the readiness check."""
        if self.port:
            check_port("127.0.0.1", self.port)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        if self.running:
            # A second set of processes would run workers under the same ids, each handing back the
            # other's tasks as ones it holds but does not run.
            raise ConfigError("this local cluster is started already (`with` starts it unless start() has)")
        self.check_port()
        self.start_redis()
        self.port = self.port or embedded.free_port()
        env = self._base_env() | {"MLOC_PORT": str(self.port), "MLOC_HOST": "127.0.0.1"}
        try:
            self.orchestrator = self._spawn(
                "orchestrator", [sys.executable, "-m", "mloc.cli", "start", "--node-type", "orchestrator"], env
            )
            for index in range(self.workers):
                worker_id = f"local-{index + 1}"
                self.add_worker(worker_id, self.worker_env_of(worker_id))
            self.wait_ready(timeout)
        except BaseException:
            # Raised out of `with`, which then never calls __exit__: what was spawned goes here.
            self.stop(grace=STOP_WAIT_SEC)
            raise
        return self

    def worker_env_of(self, worker_id: str) -> Mapping[str, str]:
        """The settings of one of the workers ``start`` makes (``local-N``), from ``worker_env``."""
        index = int(worker_id.removeprefix("local-")) - 1 if worker_id.startswith("local-") else -1
        return self.worker_env[index] if 0 <= index < len(self.worker_env) else {}

    def add_worker(self, worker_id: str, extra: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = self._base_env() | {
            "WORKER_ID": worker_id,
            "TASK_TOPICS": self.topics,
            "RESULTS_DIR": str(self.results_dir or self.home / "results"),
            "HEARTBEAT_INTERVAL_SEC": "1",
        }
        env.update(extra or {})
        proc = self._spawn(worker_id, [sys.executable, "-m", "mloc.worker.listener"], env)
        self.worker_procs[worker_id] = proc
        return proc

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        token = self.env.get("ORCHESTRATOR_TOKEN") or os.environ.get("ORCHESTRATOR_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        while True:
            for name, proc in [("orchestrator", self.orchestrator), *self.worker_procs.items()]:
                if proc is not None and proc.poll() is not None:
                    where = f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""
                    said = self._error_line(name)
                    raise ConfigError(f"{name} exited with code {proc.returncode} during start-up{said}{where}")
            with contextlib.suppress(httpx.HTTPError):
                workers = httpx.get(f"{self.api_url}/workers", headers=headers, timeout=1).json()
                # Matched by process too: the workers of another cluster on this port may have the same ids.
                ours = {name: proc.pid for name, proc in self.worker_procs.items()}
                active = {
                    w["worker_id"]
                    for w in workers.get("items", [])
                    if w["status"] == WorkerStatus.ACTIVE and ours.get(w["worker_id"]) == w.get("pid")
                }
                if set(self.worker_procs) <= active:
                    return
            if time.monotonic() > deadline:
                raise ConfigError(f"the local cluster was not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def _error_line(self, name: str) -> str:
        """': <its error>' from the last 'error: ' line a process that stopped wrote to its log, or ''."""
        if not self.log_dir:
            return ""
        try:
            with open(self.log_dir / f"{name}.log", "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - 8192))
                tail = log_file.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        said = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
        return f": {said[-1]}" if said else ""

    def stop_worker(self, worker_id: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        proc = self.worker_procs.pop(worker_id)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM to the workers and the orchestrator at once (workers hand their tasks back), then
        SIGKILL to whatever of their process trees, executor processes included, is left after
        ``grace`` seconds; the embedded Redis last, once nothing writes to it."""
        procs = [p for p in (*self.worker_procs.values(), self.orchestrator) if p is not None and p.poll() is None]
        # Read while every parent is alive (and, unreaped, keeps its pid): an orphan's link to the tree is lost.
        trees = [found for proc in procs for found in proctree.tree(proc.pid)]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + grace
        if self.orchestrator in procs:
            # A followed log never closes by itself, and the orchestrator cuts open connections only
            # after its own shutdown timeout. Everything it knows is in Redis, so it is killed sooner
            # rather than waited for (uvicorn's force-quit, a second SIGINT, prints tracebacks).
            try:
                self.orchestrator.wait(min(STOP_WAIT_SEC, grace))
            except subprocess.TimeoutExpired:
                self.orchestrator.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        proctree.kill(trees)
        for proc in procs:
            proc.wait()
        self.worker_procs.clear()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self if self.running else self.start()

    @property
    def running(self) -> bool:
        """Whether start() has spawned the orchestrator and it has not exited since."""
        return self.orchestrator is not None and self.orchestrator.poll() is None

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
