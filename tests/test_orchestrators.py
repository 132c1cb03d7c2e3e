"""Several orchestrators on one Redis: each keeps a presence record while it runs; one whose fleet-wide
settings differ from a running one's refuses to start, having touched nothing; a crashed one's record
holds a restart with new settings back only until it expires; workers read the records to say when no
orchestrator uses their Redis database, or when their heartbeat is too slow for the orchestrators' TTL.

Real processes (``python -m mloc.orchestrator.server``, ``python -m mloc.worker.listener``, started through
``-c`` only to shorten a module constant), real Orchestrator objects, real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from mloc import keys, moves, orchestrators
from mloc.errors import ConfigError
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.settings import Settings
from mloc.state import TaskState
from mloc.store import TaskStore
from tests.conftest import RedisServer, free_port
from tests.support.fleet import echo_record

# Ends a task that is still waiting, so a test can make finished tasks without a worker.
FAIL_WAITING = moves.Move("fail_waiting", TaskState.FAILED, frozenset({TaskState.PENDING}))
# A database of the session's Redis no other test uses: the worker's "wrong database".
OTHER_DB = 3


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLOC_", "REDIS_URL", "RESULTS_DIR", "LOG_", "HEARTBEAT_", "WORKER_", "TASK_TOPICS"))
        and k != "ORCHESTRATOR_TOKEN"
    }
    env.update({"PYTHONUNBUFFERED": "1", "MLOC_HOME": str(tmp_path / "home"), "RESULTS_DIR": str(tmp_path / "results")})
    env.update(extra)
    return env


class Process:
    """A real MLOC process whose output goes to a file the test reads."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, words: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if words in self.text():
                return self.text()
            time.sleep(0.1)
        raise AssertionError(f"{words!r} not in {self.log.name} within {timeout:.0f}s:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def shortened(module: str, constant: str, value: float, entry: str) -> list[str]:
    """The command that runs ``entry``'s main() with ``module.constant`` set to ``value``."""
    code = f"import {module} as m; m.{constant} = {value!r}; from {entry} import main; main()"
    return [sys.executable, "-c", code]


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def start_orchestrator(redis_url: str, tmp_path: Path, processes: list[Process]) -> Callable[..., tuple[Process, int]]:
    def start(name: str, *, refresh_sec: float = 0.5, **env: str) -> tuple[Process, int]:
        port = free_port()
        argv = shortened("mloc.orchestrators", "REFRESH_SEC", refresh_sec, "mloc.orchestrator.server")
        variables = clean_env(
            tmp_path, REDIS_URL=redis_url, MLOC_PORT=str(port), MLOC_HOST="127.0.0.1", MLOC_LOG_FILE="", **env
        )
        process = Process(argv, variables, tmp_path / f"{name}.log")
        processes.append(process)
        return process, port

    return start


def serves(process: Process, port: int, timeout: float = 60) -> float:
    """Wait until the orchestrator answers; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.proc.poll() is None, f"orchestrator exited with {process.proc.returncode}:\n{process.text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"orchestrator did not answer within {timeout:.0f}s:\n{process.text()[-3000:]}")


def records(r: redis.Redis) -> dict[int, dict]:
    """The live presence records, by pid."""
    found = {}
    for orchestrator_id in r.zrange(keys.ORCHESTRATORS, 0, -1):
        raw = r.get(keys.orchestrator(orchestrator_id))
        if raw is not None:
            record = json.loads(raw)
            found[record["pid"]] = record
    return found


def wait_records(r: redis.Redis, pids: set[int], timeout: float = 30) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while set(found := records(r)) != pids:
        assert time.monotonic() < deadline, f"records of {sorted(found)}, not {sorted(pids)}"
        time.sleep(0.05)
    return found


def finished_long_ago(redis_url: str, count: int) -> list[str]:
    """``count`` failed tasks, created three hours ago and ended two hours ago."""

    async def make() -> list[str]:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        now = time.time()
        made = []
        for _ in range(count):
            record = echo_record(store)
            record.created_at = now - 3 * 3600
            await store.insert([record])
            done = await store.transition(record.task_id, FAIL_WAITING, fields={"finished_at": repr(now - 2 * 3600)})
            assert done.ok
            made.append(record.task_id)
        await r.aclose()
        return made

    return asyncio.run(make())


def test_orchestrators_with_the_same_settings_run_side_by_side_and_a_clean_stop_removes_its_record(
    start_orchestrator: Callable[..., tuple[Process, int]], sync_redis: redis.Redis
) -> None:
    env = {"MLOC_TASK_RETENTION_SEC": "600", "ORCHESTRATOR_TOKEN": "a-secret-admin-token"}
    first, first_port = start_orchestrator("first", **env)
    serves(first, first_port)
    second, second_port = start_orchestrator("second", **env)
    serves(second, second_port)
    found = wait_records(sync_redis, {first.pid, second.pid})
    mine = found[second.pid]
    assert mine["port"] == second_port and mine["host"] and mine["started_at"] > 0
    assert mine["settings"]["MLOC_TASK_RETENTION_SEC"] == 600
    assert mine["settings"]["HEARTBEAT_TTL_SEC"] == 120
    assert mine["token"] == found[first.pid]["token"] and len(mine["token"]) == 12
    assert "a-secret-admin-token" not in json.dumps(found)
    assert "waiting up to" not in second.text()  # agreeing records make no one wait
    # Expires unless renewed: a few refreshes.
    assert 0 < sync_redis.pttl(keys.orchestrator(mine["orchestrator_id"])) <= 1500

    second.stop()
    assert second.proc.returncode == 0
    assert set(records(sync_redis)) == {first.pid}
    assert sync_redis.zscore(keys.ORCHESTRATORS, mine["orchestrator_id"]) is None


def test_an_orchestrator_with_another_retention_is_refused_naming_both_and_removes_no_task(
    start_orchestrator: Callable[..., tuple[Process, int]], sync_redis: redis.Redis, redis_url: str
) -> None:
    tasks = finished_long_ago(redis_url, 28)
    running, running_port = start_orchestrator("running")
    serves(running, running_port)
    wait_records(sync_redis, {running.pid})
    assert sync_redis.get(keys.FAIR_SHARE_HALF_LIFE) == "3600.0"

    other = {"MLOC_TASK_RETENTION_SEC": "60", "MLOC_FAIR_SHARE_HALF_LIFE_SEC": "60"}
    refused, _ = start_orchestrator("refused", **other)
    assert refused.proc.wait(60) == 2
    said = refused.text()
    error = next(line for line in said.splitlines() if line.startswith("error: "))
    assert "MLOC_TASK_RETENTION_SEC is 60 here but 2592000 there" in error
    assert "MLOC_FAIR_SHARE_HALF_LIFE_SEC is 60 here but 3600 there" in error
    assert f"(pid {running.pid}, port {running_port}, started " in error
    assert "Set the same values on every orchestrator, or stop the others first" in error
    assert "HEARTBEAT_TTL_SEC" not in error  # the same on both: not named
    assert "waiting up to" in said  # it waited to learn the other runs, and it was written again

    assert all(sync_redis.exists(keys.task(task_id)) for task_id in tasks)
    assert sync_redis.get(keys.FAIR_SHARE_HALF_LIFE) == "3600.0"
    assert set(records(sync_redis)) == {running.pid}

    # With the other stopped cleanly, no orchestrator runs: the new one's values apply, at once.
    running.stop()
    restarted, restarted_port = start_orchestrator("restarted", **other)
    serves(restarted, restarted_port)
    deadline = time.monotonic() + 30
    while any(sync_redis.exists(keys.task(task_id)) for task_id in tasks):
        assert time.monotonic() < deadline, restarted.text()
        time.sleep(0.1)
    assert sync_redis.get(keys.FAIR_SHARE_HALF_LIFE) == "60.0"
    assert "waiting up to" not in restarted.text()


class Answers:
    """Asks an orchestrator's port for /healthz every 20 ms from a thread while its process runs, counting
    the answers: a refused orchestrator must give none."""

    def __init__(self, process: Process, port: int) -> None:
        self.process, self.port = process, port
        self.answered = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._ask, daemon=True)
        self.thread.start()

    def _ask(self) -> None:
        with httpx.Client(timeout=0.5) as http:
            while self.process.proc.poll() is None and not self.done.is_set():
                try:
                    http.get(f"http://127.0.0.1:{self.port}/healthz")
                    self.answered += 1
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)

    def stop(self) -> int:
        self.done.set()
        self.thread.join(10)
        return self.answered


def exited(pair: list[Process], timeout: float = 60) -> list[Process]:
    """The processes of ``pair`` that have exited, once one has."""
    deadline = time.monotonic() + timeout
    while not (done := [process for process in pair if process.proc.poll() is not None]):
        assert time.monotonic() < deadline, "neither orchestrator exited:\n" + "\n".join(p.text()[-2000:] for p in pair)
        time.sleep(0.05)
    return done


def test_two_orchestrators_started_at_once_with_other_settings_one_is_refused_before_it_answers(
    start_orchestrator: Callable[..., tuple[Process, int]], sync_redis: redis.Redis
) -> None:
    retentions = ["600", "60"]
    for round_no in range(4):
        # Which one starts first changes every round, so either may be the one refused.
        if round_no % 2:
            retentions.reverse()
        pair = [
            start_orchestrator(f"round{round_no}-{retention}", MLOC_TASK_RETENTION_SEC=retention)
            for retention in retentions
        ]
        asking = [Answers(process, port) for process, port in pair]
        processes = [process for process, _ in pair]
        (refused,) = exited(processes)
        assert refused.proc.wait(30) == 2, refused.text()
        index = processes.index(refused)
        (running, running_port), other = pair[1 - index], retentions[1 - index]
        serves(running, running_port)
        said = refused.text()
        error = next(line for line in said.splitlines() if line.startswith("error: "))
        assert f"MLOC_TASK_RETENTION_SEC is {retentions[index]} here but {other} there" in error
        assert f"(pid {running.pid}, port {running_port}, started " in error
        # It never listened: no answer on its port, and its server never started.
        assert asking[index].stop() == 0, said
        assert "orchestrator ready" not in said and "Uvicorn running" not in said
        assert asking[1 - index].stop() > 0
        assert set(wait_records(sync_redis, {running.pid})) == {running.pid}
        assert sync_redis.get(keys.FAIR_SHARE_HALF_LIFE) == "3600.0"
        running.stop()
        assert running.proc.returncode == 0
        assert records(sync_redis) == {}

    # The same settings, started at once: both run.
    pair = [start_orchestrator(f"same-{n}", MLOC_TASK_RETENTION_SEC="600") for n in range(2)]
    for process, port in pair:
        serves(process, port)
    wait_records(sync_redis, {process.pid for process, _ in pair})
    assert all("waiting up to" not in process.text() for process, _ in pair)


def test_a_crashed_orchestrators_record_holds_a_restart_with_new_settings_back_until_it_expires(
    start_orchestrator: Callable[..., tuple[Process, int]], sync_redis: redis.Redis
) -> None:
    # Its record outlives it by 6 to 9 s: longer than the restarted process takes to start.
    crashed, crashed_port = start_orchestrator("crashed", refresh_sec=3.0)
    serves(crashed, crashed_port)
    stale = wait_records(sync_redis, {crashed.pid})[crashed.pid]
    crashed.stop(signal.SIGKILL)
    left = sync_redis.pttl(keys.orchestrator(stale["orchestrator_id"])) / 1000
    killed_at = time.monotonic()
    assert left > 0  # the record outlives its orchestrator

    restarted, restarted_port = start_orchestrator("restarted", MLOC_TASK_RETENTION_SEC="60")
    answered_at = serves(restarted, restarted_port)
    said = restarted.text()
    assert f"orchestrator {stale['orchestrator_id']} on " in said and f"(pid {crashed.pid}, " in said
    assert "MLOC_TASK_RETENTION_SEC is 60 here but 2592000 there" in said
    assert "waiting up to" in said
    # Not before the record expired (a little slack for the clocks' reading).
    assert answered_at - killed_at >= left - 0.2
    found = wait_records(sync_redis, {restarted.pid})
    assert found[restarted.pid]["settings"]["MLOC_TASK_RETENTION_SEC"] == 60


def test_a_refused_orchestrator_object_runs_no_loop_and_leaves_the_fleets_half_life(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrators, "REFRESH_SEC", 0.2)

    async def scenario() -> None:
        clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(3)]
        fleet: dict[str, Any] = {"HEARTBEAT_TTL_SEC": 60, "MLOC_FAIR_SHARE_HALF_LIFE_SEC": 7200}
        first = Orchestrator(clients[0], Settings(**fleet))
        stop = asyncio.Event()
        loops = [asyncio.create_task(first.run_scheduler(stop)), asyncio.create_task(first.run_reaper(stop))]
        deadline = time.monotonic() + 10
        while await clients[0].get(keys.FAIR_SHARE_HALF_LIFE) != "7200.0":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        # Another with the same settings joins; one with another half-life does not.
        same = Orchestrator(clients[1], Settings(**fleet))
        await same.start()
        assert len(await orchestrators.live(clients[0])) == 2
        other = Orchestrator(clients[2], Settings(**{**fleet, "MLOC_FAIR_SHARE_HALF_LIFE_SEC": 60}))
        other_stop = asyncio.Event()
        async with asyncio.timeout(10):
            await other.run_scheduler(other_stop)  # returns: refused
            await other.run_reaper(other_stop)
        assert isinstance(other.refusal, ConfigError)
        assert "MLOC_FAIR_SHARE_HALF_LIFE_SEC is 60 here but 7200 there" in other.refusal.message
        assert await clients[0].get(keys.FAIR_SHARE_HALF_LIFE) == "7200.0"
        with pytest.raises(ConfigError):
            await other.start()
        with pytest.raises(ConfigError):
            await other.cleanup()
        assert {s.record.orchestrator_id for s in await orchestrators.live(clients[0])} == {
            first.presence.record.orchestrator_id,
            same.presence.record.orchestrator_id,
        }

        # A clean stop takes the record away; the one left keeps renewing its own.
        stop.set()
        await asyncio.gather(*loops)
        await asyncio.sleep(1.0)  # past an expiry: the one left renews its record
        assert [s.record.orchestrator_id for s in await orchestrators.live(clients[0])] == [
            same.presence.record.orchestrator_id
        ]
        await same.leave()
        assert await orchestrators.live(clients[0]) == []
        for client in clients:
            await client.aclose()

    asyncio.run(scenario())


def test_of_two_orchestrator_objects_joining_in_the_same_moment_with_other_settings_exactly_one_is_refused(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrators, "REFRESH_SEC", 0.2)

    async def scenario() -> None:
        clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
        for half_life in (60, 120, 180, 240, 300):
            pair = [
                Orchestrator(client, Settings(MLOC_FAIR_SHARE_HALF_LIFE_SEC=value))
                for client, value in zip(clients, (half_life, half_life + 1), strict=True)
            ]
            # Both read the empty index before either writes: only the atomic write tells them apart.
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*(o.start() for o in pair), return_exceptions=True)
            refused = [o for o, outcome in zip(pair, outcomes, strict=True) if isinstance(outcome, ConfigError)]
            assert len(refused) == 1, outcomes
            (joined,) = [o for o in pair if o.refusal is None]
            live = await orchestrators.live(clients[0])
            assert [s.record.orchestrator_id for s in live] == [joined.presence.record.orchestrator_id]
            said = str(refused[0].refusal)
            assert f"MLOC_FAIR_SHARE_HALF_LIFE_SEC is {refused[0].settings.fair_share_half_life_sec:g} here" in said
            await joined.leave()
        for client in clients:
            await client.aclose()

    asyncio.run(scenario())


def test_another_admin_token_is_a_warning_not_a_refusal(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(orchestrators, "REFRESH_SEC", 0.2)

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        first = Orchestrator(r, Settings(ORCHESTRATOR_TOKEN="token-one-secret"))
        second = Orchestrator(r, Settings(ORCHESTRATOR_TOKEN="token-two-secret"))
        await first.start()
        with caplog.at_level("WARNING", logger="mloc.orchestrators"):
            await second.start()
        assert second.refusal is None and len(await orchestrators.live(r)) == 2
        await second.leave()
        await first.leave()
        await r.aclose()

    asyncio.run(scenario())
    warned = [record.getMessage() for record in caplog.records if "ORCHESTRATOR_TOKEN" in record.getMessage()]
    assert len(warned) == 1
    assert "uses another ORCHESTRATOR_TOKEN than this one" in warned[0]
    assert "set the same ORCHESTRATOR_TOKEN on every orchestrator" in warned[0]
    assert "secret" not in warned[0]


@pytest.fixture
def other_db(redis_server: RedisServer) -> Iterator[str]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{OTHER_DB}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def start_worker(tmp_path: Path, processes: list[Process], url: str, *, say_sec: float, **env: str) -> Process:
    argv = shortened("mloc.worker.worker", "NO_ORCHESTRATOR_SAY_SEC", say_sec, "mloc.worker.listener")
    variables = clean_env(tmp_path, REDIS_URL=url, WORKER_ID="w-1", TASK_TOPICS="tasks.*", **env)
    process = Process(argv, variables, tmp_path / "worker.log")
    processes.append(process)
    return process


def test_a_worker_on_a_database_no_orchestrator_uses_says_so_once_and_again_when_one_appears(
    start_orchestrator: Callable[..., tuple[Process, int]],
    processes: list[Process],
    other_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orchestrators, "REFRESH_SEC", 0.2)
    orchestrator, port = start_orchestrator("orchestrator")  # on database 0
    serves(orchestrator, port)
    worker = start_worker(tmp_path, processes, other_db, say_sec=1.0, HEARTBEAT_INTERVAL_SEC="0.2")
    said = worker.wait_for("no orchestrator has run on this worker's Redis")
    line = next(line for line in said.splitlines() if "no orchestrator has run" in line)
    assert f"REDIS_URL {other_db}, database {OTHER_DB}" in line
    assert "names the same server and database" in line
    time.sleep(1.5)  # many more heartbeats: said once
    assert worker.text().count("no orchestrator has run") == 1

    async def appear() -> None:
        r = aioredis.Redis.from_url(other_db, decode_responses=True)
        here = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await here.start()
        await asyncio.to_thread(worker.wait_for, f"orchestrator {here.presence.record.orchestrator_id} on ")
        await here.leave()
        await r.aclose()

    asyncio.run(appear())
    assert "runs on this worker's Redis now" in worker.text()


def test_a_worker_heartbeating_slower_than_a_third_of_the_ttl_says_what_to_change(
    start_orchestrator: Callable[..., tuple[Process, int]],
    processes: list[Process],
    redis_url: str,
    tmp_path: Path,
) -> None:
    orchestrator, port = start_orchestrator("orchestrator", HEARTBEAT_TTL_SEC="2", MLOC_REAP_INTERVAL_SEC="0.3")
    serves(orchestrator, port)
    worker = start_worker(tmp_path, processes, redis_url, say_sec=60.0, HEARTBEAT_INTERVAL_SEC="3")
    advice = (
        "this worker heartbeats every 3s (its HEARTBEAT_INTERVAL_SEC), more than a third of the orchestrator's "
        "HEARTBEAT_TTL_SEC (2s)"
    )
    said = worker.wait_for(advice)
    assert "Set HEARTBEAT_TTL_SEC to at least three intervals (9s) on every orchestrator" in said
    # Declared lost between two beats: the worker's own line says why.
    said = worker.wait_for("was marked lost; stopping its tasks and registering again (this worker heartbeats")
    lost = next(line for line in said.splitlines() if "was marked lost" in line)
    assert advice in lost
