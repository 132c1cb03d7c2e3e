"""The result folders of removed tasks: retention removes a finished task's record from Redis, and
its files go too, from every disk that holds them.

The reaper lists each task it removes on :data:`mloc.keys.TASKS_REMOVED`, in the write that removes
it. Every process that keeps result folders (each worker, each orchestrator) reads that stream as it
heartbeats or reaps, and removes ``RESULTS_DIR/<task id>`` where it has one. A folder goes only for an
id this Redis removed: ids are UUIDs, so deployments that share one RESULTS_DIR (``./results``, the
default) never remove each other's. A process that was down reads what it missed when it starts
again: the stream keeps the last :data:`KEPT` removals, and it reads them from the first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path

import redis.asyncio as aioredis

from mloc import keys

log = logging.getLogger(__name__)

KEPT = 100_000  # removals the stream keeps, about: a process down for longer leaves those folders
_BATCH = 1000
_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class FolderSweeper:
    """Removes the result folders under ``results_dir`` of the tasks removed since it last looked."""

    def __init__(self, redis: aioredis.Redis, results_dir: Path) -> None:
        self.redis = redis
        self.results_dir = results_dir
        self.position = "0"  # the last removal read: from the first the stream keeps, after a start

    async def sweep(self) -> int:
        """Read the removals listed since the last sweep and remove their folders; how many went."""
        removed = 0
        while True:
            reply = await self.redis.xread({keys.TASKS_REMOVED: self.position}, count=_BATCH)
            if not reply:
                return removed
            entries = reply[0][1]
            self.position = entries[-1][0]
            ids = [fields.get("task", "") for _, fields in entries]
            removed += await asyncio.to_thread(remove_folders, self.results_dir, ids)
            if len(entries) < _BATCH:
                return removed


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
