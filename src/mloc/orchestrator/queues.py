"""The waiting tasks a scheduling pass reads: each owner's pending queue, with what they hold and
may hold, the retries whose backoff has passed, and the reasons written on tasks left waiting.

A pending task is in the global ``PENDING`` index and in its owner's queue (``keys.pending_of``);
owners with a queue are in ``PENDING_OWNERS``. One script call reads the head of every owner's
queue with their usage and quota; tasks found no longer pending are dropped from both indexes here.
The order among owners is the scheduler's (:mod:`.scheduler`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from mloc import keys, lua
from mloc.orchestrator import fairshare
from mloc.orchestrator.placement import WaitCode
from mloc.orchestrator.standing import OwnerStanding, Standings
from mloc.records import PENDING_CODE
from mloc.state import TaskState
from mloc.store import TaskStore
from mloc.transition import pending_score


@dataclass(frozen=True)
class UserLimits:
    """What a user may hold at once where the admin set them no quota of their own
    (``MLOC_USER_MAX_TASKS`` and ``MLOC_USER_MAX_GPUS``; 0 = no limit)."""

    tasks: int = 0
    gpus: int = 0


@dataclass
class Waiting:
    """A pending task as a pass sees it: its placement request (JSON) and what orders it."""

    task_id: str
    owner: str
    req_json: str
    priority: int
    created_ms: int
    reason: str | None  # the pending reason it shows now


@dataclass
class OwnerQueue:
    """One user's share of a pass: their waiting tasks, what they hold and their limits."""

    name: str
    waiting: list[Waiting]
    tasks: int
    gpus: int
    max_tasks: int
    max_gpus: int
    next: int = 0  # the first of ``waiting`` the pass has not taken yet
    standing: OwnerStanding = field(default_factory=OwnerStanding)

    def share_key(self, unit: float) -> float:
        return fairshare.share_key(self.standing.cost, self.tasks, unit, self.standing.weight)


class PendingQueues:
    def __init__(self, store: TaskStore, standings: Standings, limits: UserLimits) -> None:
        self.redis = store.redis
        self.standings = standings
        self.limits = limits
        # When the earliest retry waiting out its backoff is due (unix seconds), as of the last promotion.
        self.next_retry_at: float | None = None
        self._promote = store.redis.register_script(lua.PROMOTE)
        self._prune_owner = store.redis.register_script(lua.PRUNE_OWNER)
        self._waiting = store.redis.register_script(lua.WAITING)
        self._checked = False

    async def promote_retries(self, limit: int = 1000) -> int:
        """Move retries whose backoff has passed into the pending queues; remember when the next is due."""
        moved, head = await self._promote(
            keys=[keys.RETRY_WAIT, keys.PENDING, keys.PENDING_OWNERS],
            args=[repr(time.time()), keys.task("{id}"), keys.pending_of("{id}"), limit],
        )
        head = head.decode() if isinstance(head, bytes) else head
        self.next_retry_at = float(head) if head else None
        return int(moved)

    async def read(self, limit: int) -> list[OwnerQueue]:
        """About ``limit`` waiting tasks, from the head of each owner's queue, with each owner's
        holdings, limits and fair-share standing (two round trips)."""
        if not self._checked:
            await self._check()
        replies = await self._waiting(
            keys=[keys.PENDING_OWNERS],
            args=[
                limit,
                keys.pending_of("{id}"),
                keys.user_usage("{id}"),
                keys.user_quota("{id}"),
                keys.task("{id}"),
            ],
        )
        owners = []
        for name, usage, quota, ids, rows in sorted(replies):
            if not ids:
                await self._prune_owner(keys=[keys.PENDING_OWNERS, keys.pending_of(name)], args=[name])
                continue
            waiting = []
            for task_id, (req_json, priority, created_ms, state, reason) in zip(ids, rows, strict=True):
                if state != TaskState.PENDING or not req_json:
                    await self._drop_stale(task_id, name)
                    continue
                waiting.append(Waiting(task_id, name, req_json, int(priority), int(created_ms), reason))
            owners.append(
                OwnerQueue(
                    name,
                    waiting,
                    tasks=int(usage[0] or 0),
                    gpus=int(usage[1] or 0),
                    max_tasks=int(self.limits.tasks if quota[0] is None else quota[0]),
                    max_gpus=int(self.limits.gpus if quota[1] is None else quota[1]),
                )
            )
        standings = await self.standings.read([owner.name for owner in owners])
        for owner in owners:
            owner.standing = standings[owner.name]
        return owners

    async def note_reasons(
        self,
        reasons: Mapping[str, str],
        unschedulable: Mapping[str, bool],
        codes: Mapping[str, WaitCode] | None = None,
    ) -> None:
        """Write why each of these tasks still waits, whether it can ever start, and its
        :class:`.placement.WaitCode` (none where it waits for room), in one round trip."""
        if not reasons:
            return
        codes = codes or {}
        pipe = self.redis.pipeline(transaction=False)
        for task_id, reason in reasons.items():
            code = codes.get(task_id)
            fields = {
                "pending_reason": reason,
                "unschedulable": "1" if unschedulable.get(task_id) else "0",
                PENDING_CODE: code.value if code is not None else "",
            }
            pipe.hset(keys.task(task_id), mapping=fields)
        await pipe.execute()

    async def _check(self) -> None:
        """Give every task in PENDING a place in its owner's queue at its score: tasks queued by an
        older MLOC had no owner's queue, or a score of another priority weight."""
        # A scan, not pages by rank: the ranks move as scores are set right.
        rows: list[tuple[str, float]] = []
        async for row in self.redis.zscan_iter(keys.PENDING, count=1000):
            rows.append(row)
            if len(rows) >= 1000:
                await self._set_right(rows)
                rows = []
        if rows:
            await self._set_right(rows)
        self._checked = True

    async def _set_right(self, rows: list[tuple[str, float]]) -> None:
        """Set each task's place in its owner's queue, and its score in both, as this MLOC scores it."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id, _ in rows:
            pipe.hmget(keys.task(task_id), "owner", "priority", "created_ms")
        found = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for (task_id, stored), (owner, priority, created_ms) in zip(rows, found, strict=True):
            if owner is None:
                continue
            score = pending_score(int(priority or 0), int(created_ms or 0))
            if score != stored:
                pipe.zadd(keys.PENDING, {task_id: score}, xx=True)  # xx: one placed meanwhile stays out
            # An entry here for a task placed meanwhile is dropped by the next read (_drop_stale).
            pipe.zadd(keys.pending_of(owner), {task_id: score})
            pipe.sadd(keys.PENDING_OWNERS, owner)
        await pipe.execute()

    async def _drop_stale(self, task_id: str, owner: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.PENDING, task_id)
        pipe.zrem(keys.pending_of(owner), task_id)
        await pipe.execute()
        await self._prune_owner(keys=[keys.PENDING_OWNERS, keys.pending_of(owner)], args=[owner])
