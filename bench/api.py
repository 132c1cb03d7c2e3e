"""API read paths and scheduling at fleet scale: 100,000 tasks, 1,000 workers.

Run: python bench/api.py [--tasks 100000] [--workers 1000] [--users 100] [--days 1095] [--n 300]

The tasks are spread over three years, so usage reports over long ranges have years of data to
read. Task records, usage aggregates and worker registrations are written straight into a private
redis-server in the shapes MLOC stores them (through MLOC's own record and registration code),
then a real orchestrator process is started on it and each endpoint is called ``--n`` times, one
call at a time, round-robin over the endpoints, on one keep-alive connection (stdlib http.client:
a light client, so the figures are the server's). Scheduling is measured in this process with MLOC's Scheduler on the same Redis:
placements per second and per-decision latency over 1,000 workers, with waiting tasks from many
users.

Usage reports: each user's first report over three years after the orchestrator starts reads every
day with usage and is timed apart, once per user (an info row); the target is for the reports after
it, which read from Redis only the days that may still change.

Baselines, measured in the same run: a raw Redis round trip (HGETALL of one task, ZREVRANGE of 50
ids) and the orchestrator's /healthz round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Server, pct
from mloc import keys
from mloc.localcluster import LocalCluster
from mloc.orchestrator.scheduler import Request, Scheduler
from mloc.orchestrator.usage import day_number
from mloc.records import Registration
from mloc.state import TaskState
from mloc.store import TaskStore
from mloc.workers import WorkerRegistry

DAY = 86_400.0
TARGET_MS = 20.0
SPEC = {
    "apiVersion": "mloc/v1",
    "kind": "InferenceTask",
    "metadata": {"name": "nightly-eval", "labels": {"team": "eval"}},
    "spec": {
        "taskType": "inference",
        "resources": {"replicas": 1, "hardware": {"cpu": "4", "memory": "16Gi", "gpu": {"type": "A100", "count": 1}}},
        "model": {"source": {"type": "huggingface", "identifier": "google/gemma-3-270m"}},
        "inference": {"max_tokens": 256, "temperature": 0.2, "prompts": [f"prompt number {i}" for i in range(8)]},
    },
}
FINAL = [TaskState.SUCCEEDED] * 8 + [TaskState.FAILED, TaskState.CANCELLED]


# ------------------------------------------------------------------- loading
def load_tasks(url: str, n: int, users: int, days: int) -> list[str]:
    """Store ``n`` tasks spread over ``days`` days and ``users`` owners, most of them finished,
    with their indexes and the per-user daily usage aggregates, as MLOC itself writes them."""
    r = redis.Redis.from_url(url, decode_responses=True)
    store = TaskStore(aioredis.Redis.from_url(url))  # only its record builder is used here
    now = time.time()
    rng = random.Random(7)
    ids: list[str] = []
    usage: dict[tuple[str, str], dict[str, float]] = {}
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        owner = f"user{rng.randrange(users):03d}"
        created = now - rng.uniform(0, days * DAY)
        task = store.new_record(
            document=SPEC,
            name="nightly-eval",
            owner=owner,
            task_type="inference",
            kind="InferenceTask",
            topic="tasks.inference",
            priority=0,
            max_attempts=3,
            request={"task_type": "inference", "topic": "tasks.inference", "gpu_count": 1},
            labels={"team": "eval"},
        )
        task.created_at = created  # back-dated over the window; its queue order (created_ms) follows
        record = task.to_hash()
        # The newest few hundred are still running; the rest ended.
        state = TaskState.RUNNING if i >= n - 300 else rng.choice(FINAL)
        wall = rng.uniform(5, 600)
        record.update(
            {
                "state": state.value,
                "pending_reason": "",
                "worker_id": f"gpu-{rng.randrange(1000):04d}",
                "attempts": "1",
                "assigned_at": repr(created + 0.01),
                "started_at": repr(created + 0.05),
                "updated_at": repr(created + wall),
            }
        )
        if state != TaskState.RUNNING:
            tokens = rng.randrange(1000, 20000)
            record.update(
                {
                    "finished_at": repr(created + wall),
                    "usage": json.dumps({"wall_sec": wall, "gpu_seconds": wall, "total_tokens": tokens}),
                    "result_summary": json.dumps({"ok": state == TaskState.SUCCEEDED, "items": 8}),
                    "reason": "" if state == TaskState.SUCCEEDED else "executor failed: bench",
                }
            )
            day = datetime.fromtimestamp(created + wall, UTC).strftime("%Y-%m-%d")
            counters = usage.setdefault((owner, day), {})
            for name, value in {
                "tasks": 1.0,
                "tasks.inference": 1.0,
                f"tasks.inference.{state}": 1.0,
                f"state.{state}": 1.0,
                "wall_sec": wall,
                "gpu_seconds": wall,
                "gpu_seconds.NVIDIA A100-SXM4-80GB": wall,
                "total_tokens": float(tokens),
                "prompt_tokens": tokens * 0.3,
                "completion_tokens": tokens * 0.7,
            }.items():
                counters[name] = counters.get(name, 0.0) + value
        created_ms = int(record["created_ms"])
        pipe.hset(keys.task(record["id"]), mapping=record)
        pipe.zadd(keys.TASKS_ALL, {record["id"]: created_ms})
        pipe.zadd(keys.tasks_in_state(state), {record["id"]: created_ms})
        pipe.zadd(keys.tasks_of_owner(owner), {record["id"]: created_ms})
        ids.append(record["id"])
        if i % 2000 == 1999:
            pipe.execute()
    for (owner, day), counters in usage.items():
        pipe.hset(keys.usage_day(owner, day), mapping={k: repr(v) for k, v in counters.items()})
        pipe.zadd(keys.usage_days(owner), {day: day_number(date.fromisoformat(day))})
        pipe.sadd(keys.USAGE_OWNERS, owner)
    pipe.execute()
    return ids


async def load_workers(url: str, n: int) -> None:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    registry = WorkerRegistry(r)
    gpus = [{"index": i, "name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 << 30} for i in range(8)]
    for i in range(n):
        await registry.register(
            Registration(
                worker_id=f"gpu-{i:04d}",
                hostname=f"node{i:04d}",
                pid=1000 + i,
                topics=["tasks.*"],
                tags=["a100", f"rack{i % 20}"],
                task_types=["inference", "sft", "echo"],
                capabilities={"inference": {"engines": ["vllm", "transformers"]}},
                hardware={"gpus": gpus, "cpu_milli": 64000, "memory_bytes": 512 << 30},
                cpu_milli=64000,
                memory_bytes=512 << 30,
                slots=8,
                version="bench",
            )
        )
    await r.aclose()


# ------------------------------------------------------------------ measuring
class Http:
    """One keep-alive connection; raises on a non-2xx answer so a broken endpoint is not timed."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.last_size = 0

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        if response.status >= 300:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        self.last_size = len(body)
        return body


def measure_api(port: int, url: str, ids: list[str], users: int, n: int) -> dict[str, tuple[list[float], int]]:
    r = redis.Redis.from_url(url)
    client = Http(port)
    rng = random.Random(11)
    today = datetime.now(UTC).date()
    week_ago = (today - timedelta(days=6)).isoformat()
    years_ago = (today - timedelta(days=3 * 365)).isoformat()
    year_ago = (today - timedelta(days=364)).isoformat()
    pages = min(2000, len(ids) // 50)

    def one_task() -> bytes:
        return client.get(f"/api/v1/tasks/{rng.choice(ids)}")

    cases: dict[str, Callable[[], Any]] = {
        "baseline: redis HGETALL task": lambda: r.hgetall(keys.task(rng.choice(ids))),
        "baseline: redis ZREVRANGE 50": lambda: r.zrevrange(keys.TASKS_ALL, 5000, 5049),
        "baseline: GET /healthz": lambda: client.get("/healthz"),
        "GET tasks page (50)": lambda: client.get(f"/api/v1/tasks?page={rng.randrange(1, pages)}&page_size=50"),
        "GET tasks page, state filter": lambda: client.get(
            f"/api/v1/tasks?page={rng.randrange(1, pages // 2)}&page_size=50&state=succeeded"
        ),
        "GET tasks page, user filter": lambda: client.get(
            f"/api/v1/tasks?page={rng.randrange(1, 15)}&page_size=50&owner=user{rng.randrange(users):03d}"
        ),
        "GET one task": one_task,
        "GET stats (all users, 30 days)": lambda: client.get("/api/v1/stats"),
        "GET stats (one user, 30 days)": lambda: client.get(f"/api/v1/stats?user=user{rng.randrange(users):03d}"),
        "GET stats (one user, 7 days)": lambda: client.get(
            f"/api/v1/stats?user=user{rng.randrange(users):03d}&start_date={week_ago}&end_date={today.isoformat()}"
        ),
        "GET stats (one user, 3 years)": lambda: client.get(
            f"/api/v1/stats?user=user{rng.randrange(users):03d}&start_date={years_ago}"
        ),
        "GET stats (one user, 3 years, by month)": lambda: client.get(
            f"/api/v1/stats?user=user{rng.randrange(users):03d}&start_date={years_ago}&group_by=month"
        ),
        "info: GET stats (all users, 1 year)": lambda: client.get(f"/api/v1/stats?start_date={year_ago}"),
        "info: GET stats (all users, 1 year, by month)": lambda: client.get(
            f"/api/v1/stats?start_date={year_ago}&group_by=month"
        ),
        "GET /workers (first 100 of 1,000)": lambda: client.get("/workers"),
        "GET /workers, a later page": lambda: client.get(f"/workers?page={rng.randrange(2, 11)}"),
        "info: GET /workers?page_size=1000": lambda: client.get("/workers?page_size=1000"),
    }
    # A user's first report over years reads every day with usage from Redis; the orchestrator keeps
    # ended days, so later reports read only the days that may still change. The first reads are
    # timed here, once per user, apart from the steady state below.
    client.get("/api/v1/stats?user=nobody")  # the once-per-Redis index check, not a user's first read
    first_reads = []
    for index in range(users):
        start = time.perf_counter()
        client.get(f"/api/v1/stats?user=user{index:03d}&start_date={years_ago}")
        first_reads.append(time.perf_counter() - start)
    first_size = client.last_size
    # Round-robin over the cases, so a burst of load from elsewhere on the machine falls on all of
    # them, baselines included, rather than on whichever ran at that moment.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    sizes: dict[str, int] = {}
    for round_ in range(n + 20):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            if round_ >= 20:  # the first rounds warm up
                samples[name].append(time.perf_counter() - start)
            sizes[name] = client.last_size if name.startswith(("GET", "info")) else 0
    measured = {name: (samples[name], sizes[name]) for name in cases}
    measured["info: GET stats (one user, 3 years, first read)"] = (first_reads, first_size)
    return measured


def walk_all_users(port: int, start: str) -> dict[str, float]:
    """Every user's usage since ``start``, page after page, as a client that wants all of it reads it."""
    client = Http(port)
    pages = users = size = 0
    after = ""
    started = time.perf_counter()
    while True:
        body = json.loads(client.get(f"/api/v1/stats?start_date={start}" + (f"&after={after}" if after else "")))
        pages, users, size = pages + 1, users + len(body["users"]), size + client.last_size
        if not body["truncated"]:
            break
        after = body["next_after"]
    return {
        "walk_ms": (time.perf_counter() - started) * 1e3,
        "walk_pages": pages,
        "walk_users": users,
        "walk_bytes": size,
    }


async def measure_scheduling(url: str, users: int, tasks: int) -> dict[str, float]:
    """Place ``tasks`` waiting tasks of ``users`` users over the 1,000 registered workers."""
    r = aioredis.Redis.from_url(url, decode_responses=True)
    store = TaskStore(r)
    scheduler = Scheduler(store, WorkerRegistry(r), heartbeat_ttl_sec=10 * DAY)
    request = {"task_type": "echo", "topic": "tasks.echo", "cpu": 1000, "mem": 1 << 30, "gpu_count": 1}
    records = [
        store.new_record(
            document={"apiVersion": "mloc/v1", "kind": "EchoTask", "spec": {"taskType": "echo"}},
            name="echo",
            owner=f"sched{i % users:03d}",
            task_type="echo",
            kind="EchoTask",
            topic="tasks.echo",
            priority=0,
            max_attempts=3,
            request=request,
            labels={},
        )
        for i in range(tasks)
    ]
    for offset in range(0, len(records), 1000):
        await store.insert(records[offset : offset + 1000])

    # Single decisions, as the submit path makes them: one place() per task.
    single = []
    for record in records[:300]:
        start = time.perf_counter()
        placement = await scheduler.place(
            record.task_id,
            Request.from_json(request),
            owner=record.owner,
            document=record.document,
            priority=0,
            created_ms=record.created_ms,
        )
        single.append(time.perf_counter() - start)
        assert placement.worker_id is not None, placement
    # Passes over the rest, as the scheduler loop makes them.
    start = time.perf_counter()
    placed = passes = 0
    while True:
        done = await scheduler.schedule_pending()
        passes += 1
        placed += done
        if done == 0:
            break
    elapsed = time.perf_counter() - start
    left = await r.zcard(keys.PENDING)
    # A pass that finds the fleet full: every waiting task is looked at, none fits.
    full = []
    if left:
        for _ in range(5):
            t0 = time.perf_counter()
            await scheduler.schedule_pending()
            full.append(time.perf_counter() - t0)
    await r.aclose()
    return {
        "place_p50_ms": pct(single, 50) * 1e3,
        "place_p99_ms": pct(single, 99) * 1e3,
        "pass_placed": placed,
        "pass_count": passes,
        "pass_decisions_per_s": placed / elapsed if elapsed else 0.0,
        "waiting_after": left,
        "full_pass_ms": pct(full, 50) * 1e3 if full else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--days", type=int, default=3 * 365, help="the tasks' creation times span this many days")
    parser.add_argument("--n", type=int, default=300, help="calls per endpoint")
    parser.add_argument("--sched-tasks", type=int, default=10_000, help="waiting tasks for the scheduling part")
    args = parser.parse_args()

    server = Server()
    try:
        started = time.perf_counter()
        ids = load_tasks(server.url, args.tasks, args.users, args.days)
        asyncio.run(load_workers(server.url, args.workers))
        memory = redis.Redis.from_url(server.url).info("memory")["used_memory_human"]
        print(
            f"loaded {len(ids):,} tasks of {args.users} users over {args.days} days and {args.workers:,} workers "
            f"in {time.perf_counter() - started:.1f}s (Redis uses {memory})",
            flush=True,
        )
        home = Path(tempfile.mkdtemp(prefix="mloc-bench-api-"))
        with LocalCluster(
            home=home,
            workers=0,
            redis_url=server.url,
            # Tasks are kept whatever their age: the data set spans years, past the default retention.
            env={"LOG_LEVEL": "WARNING", "HEARTBEAT_TTL_SEC": str(10 * DAY), "MLOC_TASK_RETENTION_SEC": "0"},
            log_dir=home / "logs",
        ) as cluster:
            print(f"orchestrator up on port {cluster.port}; {args.n} sequential calls each:", flush=True)
            api = measure_api(cluster.port, server.url, ids, args.users, args.n)
            year_ago = (datetime.now(UTC).date() - timedelta(days=364)).isoformat()
            walk = walk_all_users(cluster.port, year_ago)
        shutil.rmtree(home, ignore_errors=True)
        print(f"scheduling {args.sched_tasks:,} waiting tasks of 50 users over {args.workers:,} workers...", flush=True)
        sched = asyncio.run(measure_scheduling(server.url, 50, args.sched_tasks))
    finally:
        server.stop()

    print()
    print(f"{'':46} {'p50 ms':>8} {'p99 ms':>8} {'bytes':>9}  target p99 <= {TARGET_MS:g} ms")
    missed = []
    for name, (samples, size) in api.items():
        p99 = pct(samples, 99) * 1e3
        verdict = "" if name.startswith(("baseline", "info")) else ("ok" if p99 <= TARGET_MS else "MISSED")
        if verdict == "MISSED":
            missed.append(name)
        print(f"{name:46} {pct(samples, 50) * 1e3:8.2f} {p99:8.2f} {size or '':>9}  {verdict}")
    print()
    print(
        f"scheduling: place() p50 {sched['place_p50_ms']:.2f} ms, p99 {sched['place_p99_ms']:.2f} ms; "
        f"passes placed {sched['pass_placed']:,.0f} in {sched['pass_count']:.0f} pass(es), "
        f"{sched['pass_decisions_per_s']:,.0f} placements/s; "
        f"a pass over {sched['waiting_after']:,.0f} tasks with the fleet full: {sched['full_pass_ms']:.1f} ms"
    )
    print(
        f"stats of every user over a year, every page: {walk['walk_pages']:.0f} pages, {walk['walk_users']:.0f} users, "
        f"{walk['walk_bytes'] / 1e6:.1f} MB in {walk['walk_ms']:.0f} ms"
    )
    print("all API targets met" if not missed else f"targets missed: {', '.join(missed)}")
    print(
        json.dumps(
            {
                **{name: round(pct(s, 99) * 1e3, 3) for name, (s, _) in api.items()},
                **{k: round(v, 3) for k, v in sched.items()},
                **{k: round(v, 3) for k, v in walk.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
