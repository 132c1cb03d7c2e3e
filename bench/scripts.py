"""Redis's own time in MLOC's state-change scripts, call by call and part by part.

Every state change is a call of a script made of the transition library (``mloc.transition``). This
bench makes, on a private redis-server, the calls of an echo task's life as MLOC makes them: create and
place (a submit that finds room), then start and end together (a worker's end of work that ended at
once), with the fields, result, usage counters and log lines a worker sends. Each is timed one task per
call (a sequential task's path) and 64 per call (a worker's batch), by Redis's own accounting (``INFO
commandstats``): the script calls' time, and the part of it the commands they ran took; the rest is the
scripts' Lua and each call's handling.

Then the start-and-end call without each optional part a worker sends (the usage counted, the log lines,
the result), so the difference from the whole call is that part's cost, and a call refused at its first
check (fenced on another worker): the fixed cost of a call, its library made and its arguments decoded.
Baseline, in the same run on the same server: a script that returns at once (``return 1``). The rows
are interleaved round by round; each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Server
from mloc import moves, tasklog
from mloc.moves import Change, Reservation
from mloc.records import Registration
from mloc.settings import Settings
from mloc.state import TaskState
from mloc.store import Apply, TaskStore
from mloc.worker.accounting import daily_counters, run_usage
from mloc.workers import WorkerRegistry

WORKER = "bench-worker"
OWNER = "alice"
BATCH = 64
# As a worker on the default settings (or this environment's MLOC_LOG_RETENTION_SEC) sends it.
LOG_RETENTION_SEC = Settings().log_retention_sec
RESULT = {"ok": True, "payload": None, "worker_id": WORKER, "attempt": 1, "pid": 1, "usage": {"latency_sec": 1e-5}}
# Redis's accounting of the bench's own reads and resets, not of the scripts.
NOT_SCRIPTS = ("cmdstat_evalsha", "cmdstat_config", "cmdstat_info", "cmdstat_script")


@dataclass(frozen=True)
class Cost:
    """Redis's microseconds per script call, and the part of them its commands took."""

    per_call: float
    per_task: float
    commands: float  # per call


async def _measured(r: aioredis.Redis, calls: Callable[[], Awaitable[None]], tasks: int) -> Cost:
    """What ``calls`` (which make the moves of ``tasks`` tasks) cost Redis."""
    await r.config_resetstat()
    await calls()
    stats = await r.info("commandstats")
    scripts = stats["cmdstat_evalsha"]
    commands = sum(v["usec"] for name, v in stats.items() if name not in NOT_SCRIPTS)
    return Cost(scripts["usec"] / scripts["calls"], scripts["usec"] / tasks, commands / scripts["calls"])


class Life:
    """The moves of echo tasks' lives, as the orchestrator and a worker make them."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def created(self, n: int) -> list[Apply]:
        """``n`` new tasks, each stored and placed on the worker in one move (a submit that finds room)."""
        items = []
        for _ in range(n):
            record = self.store.new_record(
                document={"spec": {"taskType": "echo"}},
                name="echo",
                owner=OWNER,
                task_type="echo",
                kind="EchoTask",
                topic="tasks.echo",
                priority=0,
                max_attempts=3,
                request={},
                labels={},
            )
            place = Change(
                moves.PLACE,
                reserve=Reservation(WORKER, 0, 0, [], json.dumps({"task": record.task_id}), user=OWNER),
                fields={"assigned_at": repr(time.time()), "pending_reason": "", "unschedulable": "", "gpus": "[]"},
            )
            items.append(Apply(record.task_id, place, create=record))
        return items

    @staticmethod
    def ended(task_id: str, *, usage: bool = True, log: bool = True, result: bool = True) -> Apply:
        """Start and end in one call, as a worker records work that ended at once."""
        now = time.time()
        lines = (tasklog.assigned(WORKER, []), tasklog.started(WORKER, 1)) if log else ()
        start = Change(
            moves.START,
            expect_worker=WORKER,
            expect_attempt=0,
            new_attempt=True,
            fields={"started_at": repr(now), "pending_reason": "", "reason": "", "reason_code": ""},
            now=now,
            log=tuple(map(tasklog.stored, lines)),
            log_retention_sec=LOG_RETENTION_SEC,
        )
        used = run_usage({}, RESULT, 2e-4, 0, 1.0)
        end = Change(
            moves.SUCCEED,
            expect_worker=WORKER,
            expect_attempt=1,
            release=True,
            result=RESULT if result else None,
            usage=daily_counters("echo", TaskState.SUCCEEDED, used, [], []) if usage else None,
            owner=OWNER if usage else None,
            fields={"finished_at": repr(now), "usage": json.dumps(used), "reason": "", "reason_code": ""},
            now=now,
            log=(tasklog.stored(tasklog.ended(TaskState.SUCCEEDED, "", 2e-4)),) if log else (),
            log_retention_sec=LOG_RETENTION_SEC,
        )
        return Apply(task_id, start, then=end)


async def _send(store: TaskStore, items: list[Apply], per_call: int, *, refused: bool = False) -> None:
    for at in range(0, len(items), per_call):
        outcomes = await store.apply_many(items[at : at + per_call])
        if any(outcome.ok == refused for outcome in outcomes):
            raise SystemExit(f"a move was {'made' if refused else 'refused'}: {outcomes[0]}")


def _sender(store: TaskStore, items: list[Apply], per_call: int) -> Callable[[], Awaitable[None]]:
    return lambda: _send(store, items, per_call)


async def _round(r: aioredis.Redis, store: TaskStore, tasks: int) -> dict[str, Cost]:
    life = Life(store)
    costs: dict[str, Cost] = {}

    async def placed(per_call: int, *, timed: bool = False) -> list[str]:
        created = life.created(tasks)
        send = _sender(store, created, per_call)
        if timed:
            costs[f"create and place, {per_call} per call"] = await _measured(r, send, tasks)
        else:
            await send()
        return [item.task_id for item in created]

    one, batch = await placed(1, timed=True), await placed(BATCH, timed=True)
    sequential = [life.ended(task_id) for task_id in one]
    costs["start and end, 1 per call"] = await _measured(r, _sender(store, sequential, 1), tasks)
    ended = [life.ended(task_id) for task_id in batch]
    costs[f"start and end, {BATCH} per call"] = await _measured(r, _sender(store, ended, BATCH), tasks)
    for part in ("usage", "log", "result"):
        without = [life.ended(task_id, **{part: False}) for task_id in await placed(BATCH)]
        costs[f"start and end without the {part}, 1 per call"] = await _measured(r, _sender(store, without, 1), tasks)
    # Fenced on another worker: refused at its first check, after the task's state was read.
    fenced = [life.ended(task_id) for task_id in await placed(BATCH)]
    fenced = [replace(item, change=replace(item.change, expect_worker="elsewhere")) for item in fenced]
    costs["refused at its first check, 1 per call"] = await _measured(
        r, lambda: _send(store, fenced, 1, refused=True), tasks
    )
    floor = r.register_script("return 1")
    await floor()  # loaded before it is timed

    async def returns() -> None:
        for _ in range(tasks):
            await floor()

    costs["baseline: return 1"] = await _measured(r, returns, tasks)
    return costs


async def run(url: str, tasks: int, rounds: int) -> dict[str, dict[str, float]]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        registration = Registration(
            worker_id=WORKER,
            hostname="bench",
            pid=1,
            topics=["tasks.*"],
            tags=[],
            task_types=["echo"],
            capabilities={},
            hardware={"gpus": []},
            cpu_milli=1_000_000,
            memory_bytes=1 << 40,
            slots=1_000_000,
            version="bench",
        )
        await WorkerRegistry(r).register(registration)
        store = TaskStore(r)
        await _round(r, store, min(tasks, BATCH))  # warm-up: scripts loaded, keys made
        measured = [await _round(r, store, tasks) for _ in range(rounds)]
    finally:
        await r.aclose()
    table: dict[str, dict[str, float]] = {}
    for name in measured[0]:
        costs = [round_[name] for round_ in measured]
        per_call = statistics.median(c.per_call for c in costs)
        commands = statistics.median(c.commands for c in costs)
        table[name] = {
            "per_call_us": round(per_call, 1),
            "per_task_us": round(statistics.median(c.per_task for c in costs), 1),
            "commands_us": round(commands, 1),
            "rest_us": round(per_call - commands, 1),
        }
    return table


def render(table: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'Redis µs (median of the rounds)':48s} {'per call':>9s} {'per task':>9s} {'commands':>9s} {'the rest':>9s}"
    ]
    for name, row in table.items():
        cells = (row["per_call_us"], row["per_task_us"], row["commands_us"], row["rest_us"])
        lines.append(f"{name:48s} " + " ".join(f"{cell:9.1f}" for cell in cells))
    whole = table["start and end, 1 per call"]["per_call_us"]
    parts = [
        f"{part} {whole - table[f'start and end without the {part}, 1 per call']['per_call_us']:.1f}"
        for part in ("usage", "log", "result")
    ]
    lines.append(
        "the parts of a start and end call (the whole call minus the call without it), µs: " + ", ".join(parts)
    )
    floor = table["baseline: return 1"]["per_call_us"]
    lines.append(f"a start and end call costs Redis {whole / floor:.0f}x the baseline script call")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1024, help="tasks per row and round (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, interleaved (default 5)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()
    if args.tasks < 1 or args.rounds < 1:
        parser.error("--tasks and --rounds must be at least 1")
    server = Server()
    try:
        table = asyncio.run(run(server.url, args.tasks, args.rounds))
    finally:
        server.stop()
    print(render(table))
    line = json.dumps({"redis_us": table, "tasks": args.tasks, "rounds": args.rounds})
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


if __name__ == "__main__":
    main()
