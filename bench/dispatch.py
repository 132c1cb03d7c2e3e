"""Dispatch speed: a no-op task from HTTP submit to stored result, beside raw Redis Streams.

Run: python bench/dispatch.py [--latency-n 300] [--throughput-n 3000]

MLOC: a real orchestrator process and two real worker processes on a private redis-server; the
task is ``echo`` (no model). Latency is sequential: submit over HTTP, then wait for the task's
'succeeded' event in Redis; then again with an Idempotency-Key on each submit, as ``mloc submit`` and
the Python client send one. The load generator is a lean keep-alive HTTP client (bench.common.LeanHttp),
so the client's own CPU does not crowd out the system measured on the same two cores. Throughput
submits many tasks at once (concurrent single submits, and the bulk endpoint) and counts completions.

Baseline, measured in the same run on the same Redis: two consumer processes doing XREADGROUP and
XACK, a producer doing XADD, with completion signalled through a second stream: the floor of any
Streams-based dispatcher. Its throughput pipelines the XADDs in batches of 100, so it is not the
one-at-a-time "raw Streams" row of ../shared/peers.

Where the time goes: the sequential tasks' latency by step (median), from the times each task's
record keeps (placed by the orchestrator, started and finished by the worker) and the client's own;
and, for each MLOC phase, the CPU each process spent per task (orchestrator, both workers, Redis, this
load generator), from the kernel's accounting of each process (psutil), with the part of Redis's
that went to MLOC's scripts (every state change is one; their calls per task fall below one where
moves are sent together), from Redis's own INFO commandstats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import LeanHttp, Server, ms, pct
from mloc import keys
from mloc.localcluster import LocalCluster
from mloc.state import TaskState

ECHO = b"taskType: echo\n"
RAW_STREAM, RAW_DONE, RAW_GROUP, RAW_READY = "bench:raw", "bench:raw:done", "g", "bench:raw:ready"
# redis-py 8 reads with a 5 s socket timeout by default; the blocking reads here block for up to 5 s, so
# an unlucky slow reply would fail as a timeout rather than come back empty. Redis answers a BLOCK
# itself, so the socket waits longer than any BLOCK here.
SOCKET_TIMEOUT_S = 30
T = TypeVar("T")


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S)


# ------------------------------------------------------------------ baseline
def _raw_consumer(url: str, name: str, stop_after: float) -> None:
    r = _client(url)
    r.incr(RAW_READY)
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        reply = r.xreadgroup(RAW_GROUP, name, {RAW_STREAM: ">"}, count=64, block=200)
        for _, entries in reply or []:
            pipe = r.pipeline(transaction=False)
            for entry_id, fields in entries:
                pipe.xack(RAW_STREAM, RAW_GROUP, entry_id)
                pipe.xadd(RAW_DONE, {"id": fields[b"id"]})
            pipe.execute()


def raw_baseline(url: str, latency_n: int, throughput_n: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    # Daemons, stopped in the finally: a failed run then reports its own error, not the consumers'
    # "Connection closed by server" once the benchmark's Redis is stopped under them.
    consumers = [ctx.Process(target=_raw_consumer, args=(url, f"c{i}", 120), daemon=True) for i in range(2)]
    try:
        return _raw_run(url, consumers, latency_n, throughput_n)
    finally:
        for proc in consumers:
            if proc.is_alive():
                proc.terminate()
            if proc.pid is not None:
                proc.join()


def _next_done(r: redis.Redis, last: str | bytes, what: str, count: int = 1) -> list[tuple[bytes, dict[bytes, bytes]]]:
    reply = r.xread({RAW_DONE: last}, count=count, block=5000)
    if not reply:
        raise SystemExit(f"the baseline's consumers completed no entry within 5 s ({what})")
    entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
    return entries


def _raw_run(url: str, consumers: Sequence[BaseProcess], latency_n: int, throughput_n: int) -> dict[str, float]:
    r = _client(url)
    r.delete(RAW_STREAM, RAW_DONE, RAW_READY)
    r.xgroup_create(RAW_STREAM, RAW_GROUP, id="0", mkstream=True)
    for proc in consumers:
        proc.start()
    deadline = time.monotonic() + 60
    while int(r.get(RAW_READY) or 0) < len(consumers):  # spawned processes take a while to start
        if time.monotonic() > deadline:
            raise SystemExit("the baseline's consumer processes did not start within 60 s")
        time.sleep(0.05)
    # Not "$": a consumer can add the completion before this XREAD reaches Redis, and "$" would then
    # wait for the next entry, which never comes. The done stream starts empty, so "0" misses nothing.
    last: str | bytes = "0"
    latencies = []
    for i in range(latency_n):
        start = time.perf_counter()
        r.xadd(RAW_STREAM, {"id": str(i)})
        entries = _next_done(r, last, f"sequential entry {i}")
        latencies.append(time.perf_counter() - start)
        last = entries[-1][0]
    start = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(throughput_n):
        pipe.xadd(RAW_STREAM, {"id": str(i)})
        if i % 100 == 99:
            pipe.execute()
    pipe.execute()
    done = 0
    while done < throughput_n:
        entries = _next_done(r, last, f"{done} of {throughput_n} pipelined entries done", count=1000)
        done += len(entries)
        last = entries[-1][0]
    elapsed = time.perf_counter() - start
    return {"latencies": latencies, "throughput": throughput_n / elapsed}  # type: ignore[dict-item]


# ---------------------------------------------------------------------- MLOC
@dataclass(frozen=True)
class Scripts:
    """Redis's own count of the scripts it ran in a phase (INFO commandstats), per task."""

    calls: float  # script calls per task: below 1 where moves were sent together
    us: float  # microseconds Redis spent running them, per task

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float], tasks: int) -> Scripts:
        return cls((after["calls"] - before["calls"]) / tasks, (after["usec"] - before["usec"]) / tasks)


def _script_stats(r: redis.Redis) -> dict[str, float]:
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return {"calls": float(stats.get("calls", 0)), "usec": float(stats.get("usec", 0))}


class CpuMeter:
    """CPU seconds each process of the system spent during a phase, per task, and the time Redis
    spent in MLOC's scripts (its state changes) within that."""

    def __init__(self, processes: Mapping[str, int], redis_url: str) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        self.redis = redis.Redis.from_url(redis_url)
        self.phases: dict[str, dict[str, float]] = {}
        self.scripts: dict[str, Scripts] = {}

    def _now(self) -> dict[str, float]:
        times = {name: proc.cpu_times() for name, proc in self.processes.items()}
        return {name: t.user + t.system for name, t in times.items()}

    def measure(self, phase: str, tasks: int, run: Callable[[], T]) -> T:
        scripts_before = _script_stats(self.redis)
        before = self._now()
        result = run()
        after = self._now()
        self.phases[phase] = {name: (after[name] - before[name]) / tasks for name in after}
        self.scripts[phase] = Scripts.between(scripts_before, _script_stats(self.redis), tasks)
        return result

    def table(self) -> str:
        names = list(self.processes)
        lines = [
            f"{'CPU ms per task':34} "
            + " ".join(f"{name:>12}" for name in names)
            + f" {'total':>8}   of redis: scripts (calls)"
        ]
        for phase, spent in self.phases.items():
            cells = " ".join(f"{spent[name] * 1e3:12.3f}" for name in names)
            scripts = self.scripts[phase]
            lines.append(
                f"{phase:34} {cells} {sum(spent.values()) * 1e3:8.3f}   {scripts.us / 1e3:.3f} ({scripts.calls:.2f})"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Timed:
    """One sequential task, as its client saw it (unix seconds, the clock every process here shares)."""

    task_id: str
    sent: float  # the submit is sent
    answered: float  # its answer is read
    seen: float  # its 'succeeded' event is read

    @property
    def latency(self) -> float:
        return self.seen - self.sent


def mloc_latency(api: str, url: str, n: int, *, keyed: bool = False) -> list[Timed]:
    """``n`` sequential tasks; ``keyed``: each submit with its own Idempotency-Key, as ``mloc submit``
    and the Python client send them."""
    return asyncio.run(_latency(api, url, n, keyed))


async def _latency(api: str, url: str, n: int, keyed: bool) -> list[Timed]:
    r = aioredis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S)
    http = LeanHttp(api)
    timed = []
    last = (await r.xinfo_stream(keys.EVENTS))["last-generated-id"] if await r.exists(keys.EVENTS) else "0"
    for _ in range(n):
        headers = {"Idempotency-Key": str(uuid.uuid4())} if keyed else None
        sent = time.time()
        status, body = await http.post("/api/v1/tasks", ECHO, headers=headers)
        if status != 201:
            raise SystemExit(f"submit answered {status}: {body[:300]!r}")
        answered = time.time()
        task_id = json.loads(body)["task_id"]
        while True:  # the task's 'succeeded' event
            reply = await r.xread({keys.EVENTS: last}, count=100, block=5000)
            if not reply:
                raise SystemExit(f"task {task_id} never finished")
            entries = reply[0][1]
            last = entries[-1][0]
            if any(f[b"task"].decode() == task_id and f[b"to"] == b"succeeded" for _, f in entries):
                break
        timed.append(Timed(task_id, sent, answered, time.time()))
    await http.close()
    await r.aclose()
    return timed


PHASES = (
    "submit sent, read, checked, placed",
    "placed, to the worker's start",
    "run, result written",
    "end recorded, seen by the client",
    "(the submit's answer read: overlaps)",
)


def latency_phases(url: str, timed: Sequence[Timed]) -> dict[str, float]:
    """Median seconds of each step of a sequential task, from the times its record keeps: placed
    (``assigned_at``, by the orchestrator), started and finished (by the worker)."""
    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for task in timed:
        pipe.hmget(keys.task(task.task_id), "assigned_at", "started_at", "finished_at")
    steps: dict[str, list[float]] = {name: [] for name in PHASES}
    for task, stamps in zip(timed, pipe.execute(), strict=True):
        placed, started, finished = (float(stamp) for stamp in stamps)
        for name, took in zip(
            PHASES,
            (placed - task.sent, started - placed, finished - started, task.seen - finished, task.answered - task.sent),
            strict=True,
        ):
            steps[name].append(took)
    return {name: statistics.median(values) for name, values in steps.items()}


async def _submit_concurrently(api: str, n: int, concurrency: int) -> list[str]:
    ids: list[str] = []
    remaining = iter(range(n))

    async def submitter() -> None:
        http = LeanHttp(api)
        for _ in remaining:
            status, body = await http.post("/api/v1/tasks", ECHO)
            if status != 201:
                raise SystemExit(f"submit answered {status}: {body[:300]!r}")
            ids.append(json.loads(body)["task_id"])
        await http.close()

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return ids


def mloc_throughput(api: str, url: str, n: int, *, bulk: bool) -> float:
    r = redis.Redis.from_url(url)
    done_before = r.zcard(keys.tasks_in_state(TaskState.SUCCEEDED))
    start = time.perf_counter()
    if bulk:
        ids: list[str] = []
        with httpx.Client(base_url=api, timeout=60) as http:
            for offset in range(0, n, 500):
                batch = [{"spec": {"taskType": "echo"}}] * min(500, n - offset)
                ids += [t["task_id"] for t in http.post("/api/v1/tasks/bulk", json=batch).json()["tasks"]]
    else:
        ids = asyncio.run(_submit_concurrently(api, n, concurrency=8))
    # Counted on the succeeded index, not the events stream: that stream is capped, and a burst this
    # size can push events out before they are read.
    deadline = time.monotonic() + 300
    while r.zcard(keys.tasks_in_state(TaskState.SUCCEEDED)) - done_before < n:
        if time.monotonic() > deadline:
            raise SystemExit("tasks never finished")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    pipe = r.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(keys.task(task_id), "state")
    states = {state.decode() for state in pipe.execute()}
    if states != {"succeeded"}:
        raise SystemExit(f"tasks ended {sorted(states)}, not all succeeded")
    return n / elapsed


def echo_cluster(redis_url: str, home: Path) -> LocalCluster:
    """The fleet the dispatch figures are taken on (not started): an orchestrator and two workers of
    64 slots for the echo task, on ``redis_url``."""
    return LocalCluster(
        home=home,
        workers=2,
        redis_url=redis_url,
        topics="tasks.echo",
        env={"LOG_LEVEL": "WARNING", "MLOC_WORKER_SLOTS": "64"},
        log_dir=home / "logs",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--throughput-n", type=int, default=3000)
    args = parser.parse_args()

    server = Server()
    try:
        print(
            f"raw Redis Streams baseline (2 consumers, {args.latency_n} sequential, {args.throughput_n} pipelined)..."
        )
        raw = raw_baseline(server.url, args.latency_n, args.throughput_n)
        redis.Redis.from_url(server.url).flushall()
        cluster = echo_cluster(server.url, Path(tempfile.mkdtemp(prefix="mloc-bench-")))
        try:
            cluster.start(timeout=180)  # start-up is not measured; a busy machine imports slowly
            print("MLOC: orchestrator + 2 workers up; warming up...")
            mloc_latency(cluster.api_url, server.url, 30)
            assert cluster.orchestrator is not None  # started above
            meter = CpuMeter(
                {"orchestrator": cluster.orchestrator.pid}
                | {name: proc.pid for name, proc in cluster.worker_procs.items()}
                | {"redis": server.proc.pid, "load gen": os.getpid()},
                server.url,
            )
            api, url, n = cluster.api_url, server.url, args.throughput_n
            timed = meter.measure("sequential", args.latency_n, lambda: mloc_latency(api, url, args.latency_n))
            phases = latency_phases(url, timed)
            keyed = meter.measure(
                "sequential, keyed", args.latency_n, lambda: mloc_latency(api, url, args.latency_n, keyed=True)
            )
            single = meter.measure("HTTP submit, 8 clients", n, lambda: mloc_throughput(api, url, n, bulk=False))
            bulk = meter.measure("bulk submit", n, lambda: mloc_throughput(api, url, n, bulk=True))
        finally:
            cluster.stop()
    finally:
        server.stop()

    raw_lat: list[float] = raw["latencies"]  # type: ignore[assignment]
    lat = [task.latency for task in timed]
    print()
    print(f"{'':34} {'p50 ms':>8} {'p99 ms':>8} {'tasks/s':>9}")
    print(
        f"{'raw Streams, pipelined (baseline)':34} {pct(raw_lat, 50) * 1e3:8.2f} {pct(raw_lat, 99) * 1e3:8.2f} {raw['throughput']:9.0f}"
    )
    print(f"{'MLOC, HTTP submit, 8 clients':34} {pct(lat, 50) * 1e3:8.2f} {pct(lat, 99) * 1e3:8.2f} {single:9.0f}")
    print(f"{'MLOC, bulk submit':34} {'':8} {'':8} {bulk:9.0f}")
    keyed_lat = [task.latency for task in keyed]
    print(f"{'MLOC, with an Idempotency-Key':34} {pct(keyed_lat, 50) * 1e3:8.2f} {pct(keyed_lat, 99) * 1e3:8.2f}")
    print()
    print(f"MLOC latency:  {ms(lat)}")
    print(f"raw latency:   {ms(raw_lat)}")
    print(
        f"ratios vs raw: p50 x{pct(lat, 50) / pct(raw_lat, 50):.1f}, "
        f"throughput {single / raw['throughput']:.2f} (single) / {bulk / raw['throughput']:.2f} (bulk)"
    )
    print("targets: p50 <= 3 ms end to end, >= 500 tasks/s")
    print()
    print("MLOC sequential latency by step (median ms, from the task's record and the client's clock):")
    for name, took in phases.items():
        print(f"  {name:40} {took * 1e3:6.3f}")
    answered = statistics.median(task.answered - task.sent for task in timed)
    keyed_answered = statistics.median(task.answered - task.sent for task in keyed)
    print(
        f"The submit answered (median ms): {answered * 1e3:.3f} without a key, {keyed_answered * 1e3:.3f} with "
        "an Idempotency-Key (as `mloc submit` and the Python client send it)"
    )
    print()
    print(meter.table())
    print(
        json.dumps(
            {
                "mloc_p50_ms": pct(lat, 50) * 1e3,
                "mloc_p99_ms": pct(lat, 99) * 1e3,
                "mloc_tasks_per_s": single,
                "mloc_bulk_tasks_per_s": bulk,
                "mloc_latency_steps_ms": {name: round(took * 1e3, 3) for name, took in phases.items()},
                "mloc_keyed_p50_ms": pct(keyed_lat, 50) * 1e3,
                "mloc_keyed_answered_ms": keyed_answered * 1e3,
                "mloc_answered_ms": answered * 1e3,
                "raw_p50_ms": pct(raw_lat, 50) * 1e3,
                "raw_tasks_per_s": raw["throughput"],
                "cpu_ms_per_task": {
                    phase: {name: round(sec * 1e3, 4) for name, sec in spent.items()}
                    for phase, spent in meter.phases.items()
                },
                "redis_scripts_per_task": {
                    phase: {"calls": round(scripts.calls, 3), "ms": round(scripts.us / 1e3, 4)}
                    for phase, scripts in meter.scripts.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
