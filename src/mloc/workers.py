"""The worker registry: registration, heartbeats, liveness and the capacity snapshot the scheduler reads."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, lua
from mloc.errors import NotFound
from mloc.records import WorkerRecord


@dataclass
class WorkerView:
    """What the scheduler needs to know about one worker, read in one snapshot."""

    worker_id: str
    status: str
    last_heartbeat: float
    topics: list[str]
    tags: set[str]
    task_types: set[str]
    capabilities: dict[str, Any]
    gpus: list[dict[str, Any]]  # index, name, memory_bytes
    cpu_total: int
    mem_total: int
    slots_total: int
    cpu_free: int
    mem_free: int
    slots_free: int
    free_gpus: set[int]
    warm_models: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Registration:
    worker_id: str
    hostname: str
    pid: int
    topics: list[str]
    tags: list[str]
    task_types: list[str]
    capabilities: dict[str, Any]
    hardware: dict[str, Any]
    cpu_milli: int
    memory_bytes: int
    slots: int
    version: str


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._heartbeat = redis.register_script(lua.HEARTBEAT)
        self._mark_lost = redis.register_script(lua.MARK_LOST)
        self._read_workers = redis.register_script(lua.READ_WORKERS)

    async def register(self, reg: Registration, *, now: float | None = None) -> None:
        """(Re)register a worker with all its capacity free. The caller hands back what an earlier
        incarnation of the same worker id held before calling this."""
        now = time.time() if now is None else now
        gpus = reg.hardware.get("gpus", [])
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.worker(reg.worker_id), keys.worker_free_gpus(reg.worker_id))
        pipe.hset(
            keys.worker(reg.worker_id),
            mapping={
                "id": reg.worker_id,
                "status": "active",
                "hostname": reg.hostname,
                "pid": str(reg.pid),
                "topics": json.dumps(reg.topics),
                "tags": json.dumps(reg.tags),
                "task_types": json.dumps(reg.task_types),
                "capabilities": json.dumps(reg.capabilities),
                "hardware": json.dumps(reg.hardware),
                "cpu_total": str(reg.cpu_milli),
                "cpu_free": str(reg.cpu_milli),
                "mem_total": str(reg.memory_bytes),
                "mem_free": str(reg.memory_bytes),
                "slots_total": str(reg.slots),
                "slots_free": str(reg.slots),
                "warm_models": "[]",
                "registered_at": repr(now),
                "last_heartbeat": repr(now),
                "version": reg.version,
            },
        )
        if gpus:
            pipe.sadd(keys.worker_free_gpus(reg.worker_id), *[g["index"] for g in gpus])
        pipe.zadd(keys.WORKERS, {reg.worker_id: now})
        pipe.publish(keys.SCHEDULER_WAKE, "worker")
        await pipe.execute()

    async def heartbeat(self, worker_id: str, fields: dict[str, str] | None = None) -> str:
        """Refresh liveness; answers 'ok', or 'lost'/'missing' when the worker must register again."""
        reply = await self._heartbeat(
            keys=[keys.worker(worker_id), keys.WORKERS],
            args=[worker_id, repr(time.time()), json.dumps(fields) if fields else ""],
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def set_status(self, worker_id: str, status: str) -> None:
        await self.redis.hset(keys.worker(worker_id), "status", status)

    async def stale(self, ttl_sec: float, *, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return await self.redis.zrangebyscore(keys.WORKERS, "-inf", now - ttl_sec)

    async def mark_lost(self, worker_id: str, ttl_sec: float, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        marked = await self._mark_lost(
            keys=[keys.worker(worker_id), keys.WORKERS], args=[worker_id, repr(now - ttl_sec), repr(now)]
        )
        return bool(marked)

    async def task_ids(self, worker_id: str) -> list[str]:
        return sorted(await self.redis.smembers(keys.worker_tasks(worker_id)))

    async def ids(self) -> list[str]:
        return await self.redis.zrange(keys.WORKERS, 0, -1)

    async def forget(self, worker_id: str) -> None:
        await self.redis.delete(
            keys.worker(worker_id),
            keys.worker_free_gpus(worker_id),
            keys.worker_tasks(worker_id),
            keys.worker_stream(worker_id),
        )
        await self.redis.zrem(keys.WORKERS, worker_id)

    async def _read(self, worker_ids: list[str]) -> list[tuple[dict[str, str], set[str], set[str]]]:
        # One script call per batch, not three pipelined commands per worker: each reply costs the
        # client more than Redis takes to answer it.
        found = []
        templates = [keys.worker("{id}"), keys.worker_free_gpus("{id}"), keys.worker_tasks("{id}")]
        for start in range(0, len(worker_ids), 500):
            batch = worker_ids[start : start + 500]
            for fields, gpus, tasks in await self._read_workers(args=[*templates, *batch]):
                if fields:
                    found.append((dict(zip(fields[::2], fields[1::2], strict=True)), set(gpus), set(tasks)))
        return found

    async def records(self, worker_ids: list[str] | None = None) -> list[WorkerRecord]:
        ids = worker_ids if worker_ids is not None else await self.ids()
        now = time.time()
        return [
            WorkerRecord.from_hash(h, now=now, tasks=list(tasks), free_gpus=[int(g) for g in gpus])
            for h, gpus, tasks in await self._read(ids)
        ]

    async def record(self, worker_id: str) -> WorkerRecord:
        found = await self.records([worker_id])
        if not found:
            raise NotFound(f"worker {worker_id} not found; list workers with GET /workers")
        return found[0]

    async def snapshot(self) -> list[WorkerView]:
        """Every registered worker's capacity, in two round trips."""
        ids = await self.ids()
        views = []
        for h, gpus, _ in await self._read(ids):
            hardware = json.loads(h.get("hardware") or "{}")
            views.append(
                WorkerView(
                    worker_id=h["id"],
                    status=h.get("status", ""),
                    last_heartbeat=float(h.get("last_heartbeat", "0")),
                    topics=json.loads(h.get("topics") or "[]"),
                    tags=set(json.loads(h.get("tags") or "[]")),
                    task_types=set(json.loads(h.get("task_types") or "[]")),
                    capabilities=json.loads(h.get("capabilities") or "{}"),
                    gpus=hardware.get("gpus", []),
                    cpu_total=int(h.get("cpu_total", "0")),
                    mem_total=int(h.get("mem_total", "0")),
                    slots_total=int(h.get("slots_total", "0")),
                    cpu_free=int(h.get("cpu_free", "0")),
                    mem_free=int(h.get("mem_free", "0")),
                    slots_free=int(h.get("slots_free", "0")),
                    free_gpus={int(g) for g in gpus},
                    warm_models=set(json.loads(h.get("warm_models") or "[]")),
                )
            )
        return views
