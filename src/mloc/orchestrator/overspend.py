"""Hard budgets: the tasks a user over one has assigned or running are cancelled.

A budget is soft unless the admin marks it hard: an exhausted soft budget only keeps the user's
waiting tasks waiting. For a hard one the orchestrator also cancels, through the ordinary cancel
path, the user's tasks that hold capacity and that the budget covers (GPU tasks for a GPU-time
budget), with the budget as the reason and ``budget_exhausted`` as the reason code (a script tells
it from a user's cancel). Spend counts when a task ends, so this happens once a finished task has
taken the user over the limit.
"""

from __future__ import annotations

import json
import logging

from mloc import keys
from mloc.errors import MlocError
from mloc.orchestrator import budgets
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.placement import Request
from mloc.orchestrator.standing import Standings
from mloc.state import Reason, TaskState
from mloc.store import TaskStore

log = logging.getLogger(__name__)
STOPPED_BY = "budget"

# PRUNE_HARD: forget a user in the set of users with a hard budget once none of theirs is hard.
# KEYS[1] set of users with a hard budget   KEYS[2] the user's budget hash   ARGV[1] user
# Returns 1 when the user was dropped.
PRUNE_HARD = r"""
local fields = redis.call('HGETALL', KEYS[2])
for i = 2, #fields, 2 do
  local ok, body = pcall(cjson.decode, fields[i])
  if ok and type(body) == 'table' and body.hard then return 0 end
end
return redis.call('SREM', KEYS[1], ARGV[1])
"""


class Overspend:
    def __init__(self, store: TaskStore, standings: Standings) -> None:
        self.store = store
        self.standings = standings
        self._prune = store.redis.register_script(PRUNE_HARD)

    async def stop(self) -> list[str]:
        """Cancel what users over a hard budget hold; returns the ids of the tasks asked to stop."""
        redis = self.store.redis
        users = sorted(await redis.smembers(keys.BUDGETS_HARD))
        if not users:
            return []
        found = await self.standings.read(users)
        stopped: list[str] = []
        for user in users:
            hard = [s for s in found[user].budgets if s.budget.hard]
            if not hard:
                await self._prune(keys=[keys.BUDGETS_HARD, keys.user_budget(user)], args=[user])
                continue
            over = [s for s in hard if s.exhausted]
            if over and int(await redis.hget(keys.user_usage(user), "tasks") or 0) > 0:
                stopped += await self._stop_tasks_of(user, over)
        return stopped

    async def _stop_tasks_of(self, user: str, over: list[budgets.Standing]) -> list[str]:
        redis = self.store.redis
        mine = keys.tasks_of_owner(user)
        held: list[str] = []
        for state in (TaskState.ASSIGNED, TaskState.RUNNING):
            held += await redis.zinter([keys.tasks_in_state(state), mine])
        if not held:
            return []
        pipe = redis.pipeline(transaction=False)
        for task_id in held:
            pipe.hget(keys.task(task_id), "req")
        stopped = []
        for task_id, raw in zip(held, await pipe.execute(), strict=True):
            reason = budgets.holding(over, Request.from_json(json.loads(raw))) if raw else None
            if reason is None:
                continue
            try:
                why = f"cancelled: {reason}"
                await cancel(self.store, task_id, by=STOPPED_BY, reason=why, reason_code=Reason.BUDGET_EXHAUSTED)
            except MlocError as exc:  # it ended meanwhile
                log.debug("task %s not stopped for its owner's budget: %s", task_id, exc)
                continue
            log.info("task %s of %s cancelled: %s", task_id, user, reason)
            stopped.append(task_id)
        return stopped
