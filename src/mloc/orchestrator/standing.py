"""Where each task owner stands, beyond their queue: fair-share usage and weight, and budgets spent.

The scheduling pass reads it for all the owners it looks at in one script call; a budget costs reads
only for users who have one (their budget hash, and the current day's and month's usage hashes).
A submit reads its owner's, kept for a moment so a burst of submits reads it once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as aioredis

from mloc import keys
from mloc.orchestrator import fairshare
from mloc.orchestrator.budgets import Standing, holding, standings
from mloc.orchestrator.placement import Request
from mloc.transition import utc_month

# A submit's view of its owner's budgets is at most this old (the pass reads them afresh).
SUBMIT_CACHE_SEC = 0.25

# STANDING: per owner, the fair-share hash's fields and, for an owner with budgets, the budgets with
# the current day's and month's usage counters.
# KEYS: none (the hashes are named from ARGV)
# ARGV[1] template: fair-share hash   ARGV[2] template: budget hash   ARGV[3] template: today's usage
# hash   ARGV[4] template: this month's usage hash   ARGV[5..] owners
# Returns per owner {{cost, count, at, weight}, budget fields and values, day's, month's (flat)}.
STANDING = r"""
-- An owner name is data, not a pattern: a '%' in it is escaped for gsub's replacement.
local function k(template, id) return (string.gsub(template, "{id}", (string.gsub(id, "%%", "%%%%")))) end
local out = {}
for i = 5, #ARGV do
  local owner = ARGV[i]
  local budget, day, month = {}, {}, {}
  if redis.call('EXISTS', k(ARGV[2], owner)) == 1 then
    budget = redis.call('HGETALL', k(ARGV[2], owner))
    day = redis.call('HGETALL', k(ARGV[3], owner))
    month = redis.call('HGETALL', k(ARGV[4], owner))
  end
  out[#out + 1] = {redis.call('HMGET', k(ARGV[1], owner), 'cost', 'count', 'at', 'weight'), budget, day, month}
end
return out
"""


@dataclass
class OwnerStanding:
    cost: float = 0.0  # finished work, decayed to the time of the read
    count: float = 0.0  # finished tasks, decayed alike
    weight: float = fairshare.DEFAULT_WEIGHT
    budgets: list[Standing] = field(default_factory=list)

    @property
    def exhausted(self) -> list[Standing]:
        return [s for s in self.budgets if s.exhausted]


class Standings:
    def __init__(self, redis: aioredis.Redis, *, half_life_sec: float) -> None:
        self.redis = redis
        self.half_life_sec = half_life_sec
        self._read = redis.register_script(STANDING)
        self._recent: dict[str, tuple[float, OwnerStanding]] = {}

    async def read(self, owners: Sequence[str], now: float | None = None) -> dict[str, OwnerStanding]:
        """Each owner's standing as of ``now`` (the clock's unless given), in one round trip."""
        if not owners:
            return {}
        now = time.time() if now is None else now
        moment = datetime.fromtimestamp(now, UTC)
        today = moment.date()
        replies = await self._read(
            args=[
                keys.user_fair_share("{id}"),
                keys.user_budget("{id}"),
                keys.usage_day("{id}", today.isoformat()),
                keys.usage_month("{id}", utc_month(now)),
                *owners,
            ]
        )
        found = {}
        for owner, ((cost, count, at, weight), budget, day, month) in zip(owners, replies, strict=True):
            stamp = float(at) if at else now
            found[owner] = OwnerStanding(
                cost=fairshare.decayed(float(cost or 0), stamp, now, self.half_life_sec),
                count=fairshare.decayed(float(count or 0), stamp, now, self.half_life_sec),
                weight=fairshare.weight_of(weight),
                budgets=standings(budget, day, month, today) if budget else [],
            )
        return found

    async def holding(self, owner: str, req: Request) -> str | None:
        """Why an exhausted budget keeps this task of ``owner`` waiting, or None (submit time)."""
        now = time.monotonic()
        recent = self._recent.get(owner)
        if recent is None or now - recent[0] > SUBMIT_CACHE_SEC:
            if len(self._recent) > 10_000:
                self._recent.clear()
            recent = (now, (await self.read([owner]))[owner])
            self._recent[owner] = recent
        return holding(recent[1].exhausted, req, owner=owner)
