"""Shared pieces of the fault, load and security suites: an audit of how every task ended, an event
watcher, process memory, and restarting the processes a LocalCluster started."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from mloc import keys
from mloc.localcluster import LocalCluster
from tests.conftest import FAST_ENV, RedisServer

# Requeued tasks are placed again almost at once, whatever the default retry backoff is.
FAULT_ENV = {"MLOC_RETRY_BACKOFF_SEC": "0.05", "MLOC_RETRY_BACKOFF_MAX_SEC": "0.2"}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def restart_orchestrator(cluster: LocalCluster, timeout: float = 60) -> None:
    """Start the orchestrator again on the same port, as LocalCluster started it."""
    env = cluster._base_env() | {"MLOC_PORT": str(cluster.port), "MLOC_HOST": "127.0.0.1"}
    log = open(cluster.log_dir / "orchestrator.log", "ab") if cluster.log_dir else None  # noqa: SIM115
    try:
        cluster.orchestrator = subprocess.Popen(
            [sys.executable, "-m", "mloc.cli", "start", "--node-type", "orchestrator"],
            env=env,
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log is not None:
            log.close()  # the child holds its own copy
    cluster.wait_ready(timeout)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventWatcher:
    """Follows the capped events stream from a thread, fast enough that trimming loses nothing;
    :meth:`missed` says whether it did."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30)
        info = self.redis.xinfo_stream(keys.EVENTS) if self.redis.exists(keys.EVENTS) else {}
        self.last = info.get("last-generated-id", "0")
        self.added_before = int(info.get("entries-added", 0))
        self.read = 0
        self.moves: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.redis.xread({keys.EVENTS: self.last}, count=5000, block=200)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                time.sleep(0.2)  # Redis restarting: the stream is in its AOF; read on when it is back
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    self.read += 1
                    self.moves[fields["task"]].append((fields["from"], fields["to"]))

    def stop(self) -> None:
        """Read up to the last event written before this call, then stop. A fixed wait is not enough:
        on a loaded machine the reader can be seconds behind the writers."""
        written = self.redis.xinfo_stream(keys.EVENTS)["last-generated-id"] if self.redis.exists(keys.EVENTS) else "0"
        deadline = time.monotonic() + 60
        while _stream_id(self.last) < _stream_id(written) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(10)

    def missed(self) -> int:
        """Events written since the watcher started that it never read."""
        added = int(self.redis.xinfo_stream(keys.EVENTS)["entries-added"])
        return added - self.added_before - self.read

    def count(self, to: str) -> Counter[str]:
        return Counter(task for task, moves in self.moves.items() for _, target in moves if target == to)


@dataclass
class Audit:
    """How every task ended, read straight from Redis."""

    states: Counter[str] = field(default_factory=Counter)
    attempts: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def audit_tasks(
    r: redis.Redis, task_ids: Iterable[str], *, watcher: EventWatcher | None = None, results_dir: Path | None = None
) -> Audit:
    """Check that each task succeeded exactly once: one 'succeeded' transition, as many 'running'
    transitions as attempts, its result stored once and naming the attempt and worker that finished it."""
    ids = list(task_ids)
    report = Audit()
    pipe = r.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(keys.task(task_id), "state", "attempts", "worker_id", "reason")
        pipe.get(keys.task_result(task_id))
    replies = pipe.execute()
    succeeded = watcher.count("succeeded") if watcher else Counter()
    started = watcher.count("running") if watcher else Counter()
    failed = watcher.count("failed") if watcher else Counter()
    for index, task_id in enumerate(ids):
        (state, attempts, worker_id, reason), raw = replies[2 * index], replies[2 * index + 1]
        report.states[str(state)] += 1
        report.attempts[int(attempts or 0)] += 1
        if state != "succeeded":
            report.problems.append(f"{task_id}: {state} ({reason})")
            continue
        result = json.loads(raw) if raw else None
        if result is None:
            report.problems.append(f"{task_id}: succeeded without a stored result")
        elif result.get("attempt") != int(attempts) or result.get("worker_id") != worker_id:
            report.problems.append(
                f"{task_id}: result of attempt {result.get('attempt')} on {result.get('worker_id')}, "
                f"record says attempt {attempts} on {worker_id}"
            )
        if watcher is not None:
            if succeeded[task_id] != 1 or failed[task_id]:
                report.problems.append(f"{task_id}: {succeeded[task_id]} succeeded and {failed[task_id]} failed events")
            if started[task_id] != int(attempts):
                report.problems.append(f"{task_id}: {started[task_id]} running events for {attempts} attempts")
        if results_dir is not None:
            folder = results_dir / task_id
            written = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            if "responses.json" not in written:
                report.problems.append(f"{task_id}: no responses.json in {folder} ({written})")
            elif result is not None and json.loads((folder / "responses.json").read_text()) != result:
                report.problems.append(f"{task_id}: responses.json differs from the stored result")
    return report


def capacity_problems(r: redis.Redis) -> list[str]:
    """Active workers with capacity still held, or tasks still listed on any worker, once all ended."""
    problems = []
    for worker_id in r.zrange(keys.WORKERS, 0, -1):
        h = r.hgetall(keys.worker(worker_id))
        held = r.smembers(keys.worker_tasks(worker_id))
        if held:
            problems.append(f"{worker_id} ({h.get('status')}) still lists {sorted(held)[:3]}")
        if h.get("status") == "active":
            for what in ("cpu", "mem", "slots"):
                if h.get(f"{what}_free") != h.get(f"{what}_total"):
                    problems.append(f"{worker_id}: {what}_free {h.get(f'{what}_free')} of {h.get(f'{what}_total')}")
    return problems


def describe(r: redis.Redis, task_id: str, watcher: EventWatcher | None = None) -> str:
    """A task's record, its worker's state and its transitions, for a failure message."""
    record = r.hgetall(keys.task(task_id))
    record.pop("spec", None)
    record.pop("req", None)
    worker_id = record.get("worker_id") or ""
    worker = {k: v for k, v in r.hgetall(keys.worker(worker_id)).items() if k in ("status", "pid", "slots_free")}
    held = sorted(r.smembers(keys.worker_tasks(worker_id))) if worker_id else []
    moves = watcher.moves.get(task_id) if watcher else None
    return f"{task_id}: {record}; worker {worker_id} {worker} holds {held}; moves {moves}"


def wait_all_terminal(
    r: redis.Redis, task_ids: list[str], timeout: float, watcher: EventWatcher | None = None
) -> dict[str, int]:
    """Wait until every task is succeeded, failed or cancelled; returns the states seen last."""
    deadline = time.monotonic() + timeout
    counts: Counter[str] = Counter()
    while True:
        pipe = r.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(keys.task(task_id), "state")
        states = [str(s) for s in pipe.execute()]
        counts = Counter(states)
        if sum(counts[s] for s in ("succeeded", "failed", "cancelled")) == len(task_ids):
            return dict(counts)
        if time.monotonic() > deadline:
            stuck = [t for t, s in zip(task_ids, states, strict=True) if s not in ("succeeded", "failed", "cancelled")]
            detail = "\n".join(describe(r, t, watcher) for t in stuck[:5])
            raise AssertionError(f"not all {len(task_ids)} tasks ended within {timeout:.0f}s: {dict(counts)}\n{detail}")
        time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs mounted at ``path`` (needs root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@dataclass
class Secured:
    """A running orchestrator (with one worker) that requires tokens; the admin token is ``admin``."""

    cluster: LocalCluster
    admin: str
    redis_url: str
    results_dir: Path
    model_root: Path  # MLOC_MODEL_ROOTS: where users' tasks may read models from

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.cluster.api_url, headers=headers, timeout=30)

    def add_user(self, prefix: str) -> tuple[str, str]:
        """A new user with a unique name; returns (name, token)."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        with self.http(self.admin) as http:
            answer = http.post("/admin/users", json={"name": name})
        assert answer.status_code == 201, answer.text
        return name, answer.json()["token"]


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """Shared by the security modules; its own Redis, so no test's flush reaches it."""
    base = tmp_path_factory.mktemp("secured")
    server = RedisServer(base / "redis").start()
    admin = "admin-" + secrets.token_urlsafe(24)
    model_root = base / "shared-models"
    model_root.mkdir()
    cluster = LocalCluster(
        home=base / "home",
        workers=1,
        redis_url=server.url,
        results_dir=base / "results",
        # The orchestrator shares the workers' RESULTS_DIR, so it serves artifacts without a store.
        env={
            **FAST_ENV,
            **FAULT_ENV,
            "ORCHESTRATOR_TOKEN": admin,
            "RESULTS_DIR": str(base / "results"),
            "MLOC_MODEL_ROOTS": str(model_root),
        },
        log_dir=base / "logs",
    )
    try:
        cluster.start(timeout=60)
        yield Secured(cluster, admin, server.url, base / "results", model_root)
    finally:
        cluster.stop()
        server.stop()
