"""The result folders of removed tasks: retention removes a finished task's record from Redis, and
its files go too, from every disk that holds them.

The reaper lists each task it removes on :data:`mloc.keys.TASKS_REMOVED`, in the write that removes
it. Every process that keeps result folders (each worker, each orchestrator) reads that stream as it
heartbeats or reaps, and removes ``RESULTS_DIR/<task id>`` where it has one. A folder goes only for an
id this Redis removed: ids are UUIDs, so deployments that share one RESULTS_DIR (``./results``, the
default) never remove each other's. A process that was down reads what it missed when it starts
again: the stream keeps the last :data:`KEPT` removals, and it reads them from the first.

The copy a worker published to the artifact store (``MLOC_ARTIFACT_STORE``) is removed once for the
fleet, by the orchestrators alone (:class:`StoreSweeper`): the last removal whose copy is gone is kept
in Redis, so every orchestrator goes on from there, and one that starts does not list the whole stream
against the store again. A removal the store refused (unreachable, no permission) holds that position
back: it and those after it are tried again at the next reap. Removing a copy that is already gone is
no error, so two orchestrators reaping at once at worst remove the same copies twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from mloc import keys

if TYPE_CHECKING:
    from mloc.artifacts import ArtifactStore

log = logging.getLogger(__name__)

KEPT = 100_000  # removals the stream keeps, about: a process down for longer leaves those folders
_BATCH = 1000
_STORE_BATCH = 100  # removals per call into the store's thread, between two saves of the position
STORE_LIMIT = 1000  # at most this many a sweep, as many as one reap removes: a backlog spreads over reaps
_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class FolderSweeper:
    """Removes the result folders under ``results_dir`` of the tasks removed since it last looked."""

    def __init__(self, redis: aioredis.Redis, results_dir: Path, store: ArtifactStore | None = None) -> None:
        """``store``: the artifact store, given by orchestrators only (workers must not all remove the
        same copies): their sweep removes the stored copies too (:class:`StoreSweeper`)."""
        self.redis = redis
        self.results_dir = results_dir
        self.position = "0"  # the last removal read: from the first the stream keeps, after a start
        self.stored = StoreSweeper(redis, store) if store is not None else None

    async def sweep(self) -> int:
        """Read the removals listed since the last sweep and remove their folders (and, with a store,
        their stored copies); how many folders went."""
        removed = 0
        while True:
            reply = await self.redis.xread({keys.TASKS_REMOVED: self.position}, count=_BATCH)
            if not reply:
                break
            entries = reply[0][1]
            self.position = entries[-1][0]
            ids = [fields.get("task", "") for _, fields in entries]
            removed += await asyncio.to_thread(remove_folders, self.results_dir, ids)
            if len(entries) < _BATCH:
                break
        if self.stored is not None:
            await self.stored.sweep()
        return removed


class StoreSweeper:
    """Removes from the artifact store the copies of the tasks removed since the fleet last did."""

    def __init__(self, redis: aioredis.Redis, store: ArtifactStore, limit: int = STORE_LIMIT) -> None:
        self.redis = redis
        self.store = store
        self.limit = limit

    async def sweep(self) -> int:
        """Remove the stored copies of removed tasks, from the saved position on, up to the first the
        store refuses; how many copies went."""
        position = await self.redis.get(keys.TASKS_REMOVED_STORE_POSITION) or "0"
        removed = looked = 0
        while looked < self.limit:
            count = min(_STORE_BATCH, self.limit - looked)
            reply = await self.redis.xread({keys.TASKS_REMOVED: position}, count=count)
            if not reply:
                break
            entries = [(entry_id, fields.get("task", "")) for entry_id, fields in reply[0][1]]
            done, gone, refused = await asyncio.to_thread(remove_stored, self.store, entries)
            removed += gone
            looked += len(entries)
            if done is not None:
                # A plain write: two orchestrators racing may move it back, which only repeats removals.
                position = done
                await self.redis.set(keys.TASKS_REMOVED_STORE_POSITION, position)
            if refused or len(entries) < count:
                break
        return removed


def remove_stored(store: ArtifactStore, entries: list[tuple[str, str]]) -> tuple[str | None, int, bool]:
    """Remove the stored copy of each removal's task, in order, stopping at the first the store refuses:
    the last removal done (None: not the first), how many copies were there, and whether one was
    refused. Anything that is not a task id names nothing in the store and is stepped over."""
    done: str | None = None
    removed = 0
    for entry_id, task_id in entries:
        if _TASK_ID.fullmatch(task_id):
            try:
                removed += store.remove_task(task_id)
            except Exception as exc:  # each fsspec file system raises its own kinds
                log.warning(
                    "the stored copy of removed task %s stays in %s for now, retried at the next reap: %s: %s",
                    task_id,
                    store.url,
                    type(exc).__name__,
                    exc,
                )
                return done, removed, True
        done = entry_id
    if removed:
        log.info("removed the stored copies of %d task(s) past their retention from %s", removed, store.url)
    return done, removed, False


def remove_folders(results_dir: Path, task_ids: list[str]) -> int:
    """Remove ``results_dir/<id>`` of each task id that has one; how many were removed. Anything that
    is not a task id names no folder here (never a path outside ``results_dir``)."""
    removed = 0
    for task_id in task_ids:
        if not _TASK_ID.match(task_id):
            continue
        folder = results_dir / task_id
        if not folder.is_dir():
            continue
        try:
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:
            log.warning("the result folder %s of a removed task stays: %s", folder, exc.strerror or exc)
    if removed:
        log.info("removed %d result folder(s) of tasks past their retention from %s", removed, results_dir)
    return removed
