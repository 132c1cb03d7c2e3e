"""Usage statistics per user and UTC day, from the daily aggregates the transition script keeps.

A day's counters stop changing once the day is over, so the orchestrator keeps ended days in
memory and each request reads from Redis only the days that may still change (today and
yesterday: a worker's clock, which names the day, may lag), in one round trip. A report over
every user and a month costs a few milliseconds however many tasks ran, instead of one read per
user and day.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import date, timedelta
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, lua

# Days this far before today, and earlier, are over: nothing is added to them any more.
OPEN_DAYS = 2
MAX_CACHED_DAYS = 500_000  # (user, day) entries kept, about 50 MB at worst
MAX_CACHED_TOTALS = 20_000  # (user, range) sums kept
READ_BATCH = 1000  # hashes per script call, so one call never holds Redis for long


class UsageReports:
    """Builds the /api/v1/stats answer; keeps ended days so repeated reports are cheap."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._read_hashes = redis.register_script(lua.READ_HASHES)
        # (user, day) -> {"date": day, counter: value, ...}; an empty dict for a day without usage.
        self._days: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        # (user, first day, last day) of an ended range -> summed counters.
        self._totals: OrderedDict[tuple[str, str, str], dict[str, float]] = OrderedDict()

    async def _read(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for start in range(0, len(wanted), READ_BATCH):
            batch = wanted[start : start + READ_BATCH]
            replies = await self._read_hashes(keys=[keys.usage_day(user, day) for user, day in batch])
            for (user, day), flat in zip(batch, replies, strict=True):
                counters = {str(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
                found[(user, day)] = {"date": day, **counters} if counters else {}
        return found

    def _remember(self, read: dict[tuple[str, str], dict[str, Any]]) -> None:
        self._days.update(read)
        while len(self._days) > MAX_CACHED_DAYS:
            self._days.popitem(last=False)

    def _sum(self, entries: list[dict[str, Any]]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for entry in entries:
            for name, value in entry.items():
                if name != "date":
                    totals[name] = totals.get(name, 0.0) + value
        return totals

    async def report(self, users: list[str], start: date, end: date, today: date) -> list[dict[str, Any]]:
        """Per user: totals over ``start``..``end`` and the days with usage, oldest first."""
        days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        last_ended = (today - timedelta(days=OPEN_DAYS)).isoformat()
        ended = [d for d in days if d <= last_ended]
        current = [d for d in days if d > last_ended]
        missing = [(u, d) for u in users for d in ended if (u, d) not in self._days]
        live = await self._read(missing + [(u, d) for u in users for d in current])
        self._remember({pair: live[pair] for pair in missing})
        answer = []
        for user in users:
            past = [self._days.get((user, d)) or live.get((user, d)) or {} for d in ended]
            recent = [live[(user, d)] for d in current]
            totals: dict[str, float] = {}
            if ended:
                span = (user, ended[0], ended[-1])
                cached = self._totals.get(span)
                if cached is None:
                    cached = self._sum(past)
                    self._totals[span] = cached
                    while len(self._totals) > MAX_CACHED_TOTALS:
                        self._totals.popitem(last=False)
                totals = dict(cached)
            for name, value in self._sum(recent).items():
                totals[name] = totals.get(name, 0.0) + value
            answer.append({"user": user, "totals": totals, "days": [e for e in past + recent if e]})
        return answer
