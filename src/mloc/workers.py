"""The worker registry: registration, heartbeats, liveness, and reading workers back (the API's
records, the scheduler's capacity snapshot). The hash's shape is in :mod:`mloc.records`."""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from mloc import keys, lua
from mloc.errors import Conflict, NotFound
from mloc.records import CHANGING_FIELDS, CORDONED, Registration, WorkerRecord, WorkerStatus, WorkerView


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._heartbeat = redis.register_script(lua.HEARTBEAT)
        self._mark_lost = redis.register_script(lua.MARK_LOST)
        self._read_workers = redis.register_script(lua.READ_WORKERS)
        self._snapshot = redis.register_script(lua.SNAPSHOT)
        self._read_hashes = redis.register_script(lua.READ_HASHES)
        # What each worker stated at registration, by worker id, with its registered_at: read again
        # only when the worker registers anew.
        self._registered: dict[str, tuple[str, WorkerView]] = {}
        # Counts the changes to the set of registrations seen by :meth:`snapshot`, so a cache of
        # what fits which registration knows when to start over.
        self.registrations = 0

    async def register(self, reg: Registration, *, now: float | None = None) -> None:
        """(Re)register a worker with all its capacity free. The caller hands back what an earlier
        incarnation of the same worker id held before calling this."""
        now = time.time() if now is None else now
        gpus = reg.hardware.get("gpus", [])
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.worker(reg.worker_id), keys.worker_free_gpus(reg.worker_id))
        pipe.hset(keys.worker(reg.worker_id), mapping=reg.to_hash(now))
        if gpus:
            pipe.sadd(keys.worker_free_gpus(reg.worker_id), *[g["index"] for g in gpus])
        pipe.zadd(keys.WORKERS, {reg.worker_id: now})
        pipe.publish(keys.SCHEDULER_WAKE, "worker")
        await pipe.execute()

    async def heartbeat(self, worker_id: str, fields: dict[str, str] | None = None) -> str:
        """Refresh liveness (and ``fields``, see :func:`mloc.records.heartbeat_fields`); answers 'ok',
        or the worker's status (or 'missing') when it must register again."""
        reply = await self._heartbeat(
            keys=[keys.worker(worker_id), keys.WORKERS],
            args=[worker_id, repr(time.time()), json.dumps(fields) if fields else ""],
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def set_status(self, worker_id: str, status: WorkerStatus) -> None:
        await self.redis.hset(keys.worker(worker_id), "status", status.value)

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
            WorkerRecord.of(WorkerView.from_hash(h, gpus), now=now, tasks=tasks, cordoned=h.get(CORDONED) == "1")
            for h, gpus, tasks in await self._read(ids)
        ]

    async def record(self, worker_id: str) -> WorkerRecord:
        found = await self.records([worker_id])
        if not found:
            raise NotFound(f"worker {worker_id} not found; list workers with GET /workers")
        return found[0]

    async def snapshot(self) -> list[WorkerView]:
        """Every registered worker, in one round trip (two when some registered anew): what a worker
        stated at registration is read again only when it registers anew."""
        flat = await self._snapshot(
            keys=[keys.WORKERS], args=[keys.worker("{id}"), keys.worker_free_gpus("{id}"), *CHANGING_FIELDS]
        )
        rows = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
        changed = [wid for wid, f, _ in rows if f[0] is not None and self._registered.get(wid, ("",))[0] != f[0]]
        if changed or len(self._registered) != len(rows):
            present = {wid for wid, _, _ in rows}
            self._registered = {wid: entry for wid, entry in self._registered.items() if wid in present}
            self.registrations += 1
        for start in range(0, len(changed), 500):
            batch = changed[start : start + 500]
            replies = await self._read_hashes(keys=[keys.worker(w) for w in batch])
            for wid, flat_fields in zip(batch, replies, strict=True):
                h = dict(zip(flat_fields[::2], flat_fields[1::2], strict=True))
                if h:
                    self._registered[wid] = (h.get("registered_at", ""), WorkerView.from_hash(h))
        views = []
        for wid, f, free in rows:
            entry = self._registered.get(wid)
            if f[0] is None or entry is None:
                continue  # deregistered meanwhile
            # f: registered_at, then the values of records.CHANGING_FIELDS in order.
            views.append(entry[1].refreshed(f[1:], free))
        return views

    async def cordon(self, worker_id: str, *, on: bool) -> str:
        """Stop (``on``) or resume placing new tasks on a live worker, and return its status before.
        A cordoned worker is draining, as when it stops, but keeps running: what it runs finishes
        there, and it heartbeats on. Registering again (a restart) lifts it."""
        want, becomes = (
            (WorkerStatus.ACTIVE, WorkerStatus.DRAINING) if on else (WorkerStatus.DRAINING, WorkerStatus.ACTIVE)
        )
        for _ in range(3):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.worker(worker_id))
                    status, cordoned = (
                        v.decode() if isinstance(v, bytes) else v
                        for v in await pipe.hmget(keys.worker(worker_id), "status", CORDONED)
                    )
                    if status is None:
                        raise NotFound(f"worker {worker_id} not found; list workers with `mloc workers`")
                    if on and status == WorkerStatus.DRAINING and cordoned:
                        return str(status)  # cordoned already: asking twice is no error
                    if not on and status == WorkerStatus.ACTIVE and not cordoned:
                        return str(status)
                    if status != want or (not on and not cordoned):
                        stopping = " (it is stopping by itself)" if status == WorkerStatus.DRAINING else ""
                        raise Conflict(
                            f"worker {worker_id} is {status}{stopping}; only an active worker can be cordoned, "
                            "and only a cordoned one uncordoned"
                        )
                    pipe.multi()
                    pipe.hset(keys.worker(worker_id), "status", becomes.value)
                    if on:
                        pipe.hset(keys.worker(worker_id), CORDONED, "1")
                    else:
                        pipe.hdel(keys.worker(worker_id), CORDONED)
                        pipe.publish(keys.SCHEDULER_WAKE, "worker")  # tasks may wait for it
                    await pipe.execute()
                    return str(status)
                except aioredis.WatchError:
                    continue
        raise Conflict(f"worker {worker_id} changed while it was being cordoned; try again")

    async def remove_stopped(self, worker_id: str) -> str:
        """Forget a worker that stopped (offline) or was declared lost, and return that status. A worker
        that may still run tasks, or still holds some, is refused with Conflict."""
        for _ in range(3):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.worker(worker_id), keys.worker_tasks(worker_id))
                    status = await pipe.hget(keys.worker(worker_id), "status")
                    if status is None:
                        raise NotFound(f"worker {worker_id} not found; list workers with `mloc workers --all`")
                    status = status.decode() if isinstance(status, bytes) else str(status)
                    if status not in (WorkerStatus.OFFLINE, WorkerStatus.LOST):
                        raise Conflict(
                            f"worker {worker_id} is {status}; only an offline or lost worker can be removed "
                            "(stop it first: it goes offline when it exits)"
                        )
                    held = await pipe.scard(keys.worker_tasks(worker_id))
                    if held:
                        raise Conflict(
                            f"worker {worker_id} is {status} but still holds {held} task(s); "
                            "`mloc cleanup` requeues them, then remove it"
                        )
                    pipe.multi()
                    pipe.delete(
                        keys.worker(worker_id),
                        keys.worker_free_gpus(worker_id),
                        keys.worker_tasks(worker_id),
                        keys.worker_stream(worker_id),
                    )
                    pipe.zrem(keys.WORKERS, worker_id)
                    await pipe.execute()
                    return status
                except aioredis.WatchError:
                    continue  # it changed while we looked (a heartbeat, a re-registration): look again
        raise Conflict(f"worker {worker_id} kept changing while being removed; it is probably running again")
