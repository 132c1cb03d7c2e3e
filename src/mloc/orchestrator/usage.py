"""Usage statistics per user and UTC day, from the daily aggregates the transition script keeps.

Each owner has an index of the days on which they used anything (:func:`mloc.keys.usage_days`), so
a report over ten years reads only those days, never one key per calendar day. A day's counters stop
changing once the day is over, so the orchestrator keeps ended days in memory, and what the ended
part of a requested range sums to; a repeated request reads from Redis only the days that may still
change (yesterday, today and any later day: a worker's clock, which names the day, may be off), in
one round trip. Days are summed into ISO weeks, months or one total on request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mloc import keys, lua

if TYPE_CHECKING:  # the CLI imports Grouping, and should not pay for the Redis client
    import redis.asyncio as aioredis

EPOCH = date(1970, 1, 1)
# Days this far before today, and earlier, are over: nothing is added to them any more.
OPEN_DAYS = 2
MAX_CACHED_DAYS = 500_000  # (user, day) entries kept, about 50 MB at worst
MAX_CACHED_SPAN_ROWS = 200_000  # rows of summed ranges kept (a day row is shared with the day cache)
READ_BATCH = 1000  # hashes per script call, so one call never holds Redis for long
INDEX_BATCH = 1000  # usage hashes indexed per round trip when the day indexes are first built


class Grouping(StrEnum):
    """How a report's rows are cut; every grouping also gives the totals over the whole range."""

    DAY = "day"  # a row per day with usage, {"date": "2026-11-30", counter: value, ...}
    WEEK = "week"  # a row per ISO week with usage, {"period": "2026-W48", ...}; the ISO year may differ
    MONTH = "month"  # a row per month with usage, {"period": "2026-11", ...}
    TOTAL = "total"  # no rows


def day_number(day: date) -> int:
    """Days since 1970-01-01: the score of a day in the usage day indexes."""
    return (day - EPOCH).days


def period_of(day: str, grouping: Grouping) -> str:
    """The label of the week or month a day (YYYY-MM-DD) falls in."""
    if grouping is Grouping.MONTH:
        return day[:7]
    if grouping is Grouping.WEEK:
        year, week, _ = date.fromisoformat(day).isocalendar()
        return f"{year}-W{week:02d}"
    return day


def _counters(flat: list[Any]) -> dict[str, float]:
    """A hash's counters from its flat field/value list."""
    return dict(zip(flat[::2], map(float, flat[1::2]), strict=True)) if flat else {}


@dataclass
class _Part:
    """Totals and rows over some days with usage."""

    totals: dict[str, float]
    rows: list[dict[str, Any]]  # day rows (shared with the day cache), or period rows


class UsageReports:
    """Builds the /api/v1/stats answer; keeps ended days, and what they sum to, so repeated reports
    are cheap."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._read_hashes = redis.register_script(lua.READ_HASHES)
        self._read_usage = redis.register_script(lua.READ_USAGE)
        # (user, day) -> the row of an ended day, {"date": day, counter: value, ...}: never changed.
        self._days: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        # (user, grouping, first day, last day) of a range of ended days -> its totals and rows.
        self._spans: OrderedDict[tuple[str, Grouping, int, int], _Part] = OrderedDict()
        self._span_rows = 0
        self._indexed = False
        self._index_lock = asyncio.Lock()

    async def _ensure_index(self) -> None:
        """Index the days of usage hashes written before day indexes existed: once per Redis."""
        if self._indexed:
            return
        async with self._index_lock:
            if self._indexed:
                return
            if not await self.redis.exists(keys.USAGE_DAYS_BUILT):
                pipe = self.redis.pipeline(transaction=False)
                async for key in self.redis.scan_iter(match=keys.usage_day("*", "*"), count=INDEX_BATCH):
                    found = keys.owner_and_day(key)
                    if found is not None:
                        owner, day = found
                        pipe.zadd(keys.usage_days(owner), {day: day_number(date.fromisoformat(day))})
                    if len(pipe) >= INDEX_BATCH:
                        await pipe.execute()
                await pipe.execute()
                await self.redis.set(keys.USAGE_DAYS_BUILT, "1")
            self._indexed = True

    async def _read_ended(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """Read ended days, into the cache and, for a report too large for the cache, the answer."""
        read: dict[tuple[str, str], dict[str, Any]] = {}
        for start in range(0, len(wanted), READ_BATCH):
            batch = wanted[start : start + READ_BATCH]
            replies = await self._read_hashes(keys=[keys.usage_day(user, day) for user, day in batch])
            for (user, day), flat in zip(batch, replies, strict=True):
                read[(user, day)] = {"date": day, **_counters(flat)} if flat else {}
        self._days.update(read)
        while len(self._days) > MAX_CACHED_DAYS:
            self._days.popitem(last=False)
        return read

    def _keep_span(self, key: tuple[str, Grouping, int, int], part: _Part) -> None:
        self._spans[key] = part
        self._span_rows += len(part.rows) + 1
        while self._span_rows > MAX_CACHED_SPAN_ROWS and self._spans:
            _, dropped = self._spans.popitem(last=False)
            self._span_rows -= len(dropped.rows) + 1

    async def report(
        self, users: list[str], start: date, end: date, today: date, grouping: Grouping = Grouping.DAY
    ) -> list[dict[str, Any]]:
        """Per user: totals over ``start``..``end`` and the rows of ``grouping``, oldest first."""
        if not users:
            return []
        await self._ensure_index()
        first, last = day_number(start), day_number(end)
        open_first = day_number(today) - OPEN_DAYS + 1
        ended_last = min(last, open_first - 1)
        span_keys = {user: (user, grouping, first, ended_last) for user in users}
        known = {user: self._spans.get(span_keys[user]) for user in users} if first <= ended_last else {}
        args: list[Any] = [max(first, open_first), last]
        for user in users:
            # Ended days already summed for this range need not even be listed.
            wanted = (1, 0) if known.get(user) is not None else (first, ended_last)
            args += [keys.usage_day(user, "{id}"), *wanted]
        replies = await self._read_usage(keys=[keys.usage_days(user) for user in users], args=args)
        missing = [
            (user, day)
            for user, (ended, _, _) in zip(users, replies, strict=True)
            for day in ended
            if (user, day) not in self._days
        ]
        fresh = await self._read_ended(missing)
        answer = []
        for user, (ended, open_days, open_counters) in zip(users, replies, strict=True):
            part = known.get(user)
            if part is None:
                rows = (fresh.get((user, day)) or self._days.get((user, day)) for day in ended)
                part = _summed([row for row in rows if row], grouping)
                if first <= ended_last:
                    self._keep_span(span_keys[user], part)
            opened = [
                {"date": day, **counters}
                for day, flat in zip(open_days, open_counters, strict=True)
                if (counters := _counters(flat))
            ]
            answer.append({"user": user, **_joined(part, _summed(opened, grouping), grouping)})
        return answer


def _summed(rows: list[dict[str, Any]], grouping: Grouping) -> _Part:
    """Totals and the rows of a grouping from day rows, oldest first."""
    totals: dict[str, float] = {}
    periods: dict[str, dict[str, Any]] = {}
    for row in rows:
        label = period_of(row["date"], grouping) if grouping in (Grouping.WEEK, Grouping.MONTH) else ""
        period = periods.get(label) if label else None
        if label and period is None:
            period = periods[label] = {"period": label}
        for name, value in row.items():
            if name != "date":
                totals[name] = totals.get(name, 0.0) + value
                if period is not None:
                    period[name] = period.get(name, 0.0) + value
    if grouping is Grouping.DAY:
        return _Part(totals, rows)
    return _Part(totals, list(periods.values()))


def _joined(ended: _Part, opened: _Part, grouping: Grouping) -> dict[str, Any]:
    """The answer for one user: the ended days' part (cached, so left unchanged) and the open days'."""
    totals = dict(ended.totals)
    for name, value in opened.totals.items():
        totals[name] = totals.get(name, 0.0) + value
    if grouping is Grouping.TOTAL:
        return {"totals": totals}
    rows = ended.rows + opened.rows
    if grouping is Grouping.DAY:
        return {"totals": totals, "days": rows}
    # The open days may fall in the last ended period (yesterday and today, in the same month).
    if ended.rows and opened.rows and ended.rows[-1]["period"] == opened.rows[0]["period"]:
        merged = dict(ended.rows[-1])
        for name, value in opened.rows[0].items():
            if name != "period":
                merged[name] = merged.get(name, 0.0) + value
        rows = [*ended.rows[:-1], merged, *opened.rows[1:]]
    return {"totals": totals, "periods": rows}
