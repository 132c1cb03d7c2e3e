"""Budgets: how much a user may spend per UTC day or month, in the units LLM work costs.

A budget limits one metric (tokens in, out or both, GPU-seconds, on one GPU model or any, CPU-seconds)
over one period. Spend is what the user's finished tasks recorded (the usage counters the transition
script adds when a task ends: the day's hash, and a month's hash of the same counters), so a task
running now counts once it ends. A user whose budget is exhausted keeps their waiting tasks pending
with the reason ("budget exhausted: 1.02M of 1M tokens this month; resets 2027-01-01") until the
admin raises the budget or the period turns; their running tasks go on, unless the budget is
``hard``: then the orchestrator cancels them too (:func:`enforce_hard`).

Which tasks an exhausted budget holds back: every task for tokens and CPU time (any task may use
them), tasks that ask for GPUs for GPU time, and for GPU time on one model, GPU tasks that may land
on that model (the model they ask for matches it, or they take any).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.budgetunits import COUNTERS, NOUNS, Metric, Period, check_limits, format_amount
from mloc.errors import BadRequest, NotFound
from mloc.orchestrator.placement import Request, gpu_matches
from mloc.records import ADMIN


def period_bounds(period: Period, today: date) -> tuple[str, date]:
    """The words for the current period and the UTC day it resets on."""
    if period is Period.DAY:
        return "today", today + timedelta(days=1)
    month = today.month % 12 + 1
    return "this month", date(today.year + (today.month == 12), month, 1)


@dataclass(frozen=True)
class Budget:
    metric: Metric
    period: Period
    limit: float
    hard: bool = False
    gpu_model: str | None = None  # GPU time on this model only (matched as placement matches GPU types)

    @property
    def field(self) -> str:
        """Its field in the user's budget hash: one budget per metric, model and period."""
        metric = f"{self.metric.value}:{self.gpu_model}" if self.gpu_model else self.metric.value
        return f"{metric}/{self.period.value}"

    @property
    def noun(self) -> str:
        noun = NOUNS[self.metric]
        return f"{noun} on {self.gpu_model}" if self.gpu_model else noun

    def spent(self, counters: Mapping[str, float]) -> float:
        """What the period's usage counters say was spent against this budget."""
        if self.gpu_model:
            prefix = "gpu_seconds."
            return sum(
                value
                for name, value in counters.items()
                if name.startswith(prefix) and gpu_matches(self.gpu_model, name[len(prefix) :])
            )
        return sum(counters.get(name, 0.0) for name in COUNTERS[self.metric])

    def holds(self, req: Request) -> bool:
        """Whether this budget, exhausted, keeps a task of this request waiting."""
        if self.metric is not Metric.GPU_TIME:
            return True
        if req.gpu_count == 0:
            return False
        if not self.gpu_model:
            return True
        if req.gpu_type.strip().lower() in ("", "any", "*"):
            return True
        # The task's GPU type and the budget's model name the same GPUs when one's words hold the other's.
        return gpu_matches(req.gpu_type, self.gpu_model) or gpu_matches(self.gpu_model, req.gpu_type)

    def encode(self) -> str:
        return json.dumps({"limit": self.limit, "hard": self.hard})

    @classmethod
    def decode(cls, field: str, value: str) -> Budget | None:
        """The budget stored in one field of the hash; None for a field this version cannot read."""
        metric_text, _, period_text = field.rpartition("/")
        metric_name, _, model = metric_text.partition(":")
        try:
            body = json.loads(value)
            return cls(
                Metric(metric_name), Period(period_text), float(body["limit"]), bool(body.get("hard")), model or None
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Standing:
    """A budget with what was spent against it in the current period."""

    budget: Budget
    spent: float
    today: date

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget.limit

    @property
    def text(self) -> str:
        metric = self.budget.metric
        words, _ = period_bounds(self.budget.period, self.today)
        spent, limit = format_amount(metric, self.spent), format_amount(metric, self.budget.limit)
        return f"{spent} of {limit} {self.budget.noun} {words}"

    @property
    def resets(self) -> date:
        """The UTC day the period turns on (at 00:00 UTC)."""
        return period_bounds(self.budget.period, self.today)[1]

    @property
    def resets_at(self) -> float:
        """When the period turns, in unix seconds."""
        return datetime.combine(self.resets, datetime.min.time(), tzinfo=UTC).timestamp()

    @property
    def reason(self) -> str:
        """Why a task waits (or was stopped) on this budget."""
        hard = " (hard limit)" if self.budget.hard else ""
        return f"budget exhausted{hard}: {self.text}; resets {self.resets.isoformat()}"

    def waiting_reason(self, owner: str) -> str:
        """Why a task of ``owner`` waits on this budget, and what lets it start: the user can only
        wait for the reset, so it also names the admin's command that raises this very budget
        (``--hard`` again, as setting a budget replaces it whole)."""
        budget = self.budget
        flags = [f"--{budget.metric.value.replace('_', '-')} N"]
        if budget.gpu_model:
            flags.append(f"--gpu-model {shlex.quote(budget.gpu_model)}")
        flags.append(f"--per {budget.period.value}")
        if budget.hard:
            flags.append("--hard")
        command = f"mloc users set-budget {shlex.quote(owner)} {' '.join(flags)}"
        return f"{self.reason}; it starts then, or once an admin raises the budget: `{command}`"

    def to_dict(self) -> dict[str, Any]:
        _, resets = period_bounds(self.budget.period, self.today)
        return {
            "metric": self.budget.metric.value,
            "gpu_model": self.budget.gpu_model,
            "period": self.budget.period.value,
            "limit": self.budget.limit,
            "spent": self.spent,
            "hard": self.budget.hard,
            "exhausted": self.exhausted,
            "resets": resets.isoformat(),
            "text": self.text,
        }


def _counters(flat: Sequence[Any]) -> dict[str, float]:
    return {str(name): float(value) for name, value in zip(flat[::2], flat[1::2], strict=True)}


def standings(
    budget_flat: Sequence[Any], day_flat: Sequence[Any], month_flat: Sequence[Any], today: date
) -> list[Standing]:
    """A user's budgets with their spend, from the flat field/value lists of the budget hash and of
    the current day's and month's usage hashes."""
    day, month = _counters(day_flat), _counters(month_flat)
    found = []
    for field, value in zip(budget_flat[::2], budget_flat[1::2], strict=True):
        budget = Budget.decode(str(field), str(value))
        if budget is not None:
            counters = day if budget.period is Period.DAY else month
            found.append(Standing(budget, budget.spent(counters), today))
    return sorted(found, key=lambda s: s.budget.field)


def holding(exhausted: Sequence[Standing], req: Request, *, owner: str | None = None) -> str | None:
    """The reason the first exhausted budget that holds this request gives, or None. With ``owner``,
    the reason a waiting task of theirs shows (:meth:`Standing.waiting_reason`); without, the bare
    one, as a cancel gives."""
    for standing in exhausted:
        if standing.budget.holds(req):
            return standing.reason if owner is None else standing.waiting_reason(owner)
    return None


def last_to_reset(exhausted: Sequence[Standing], req: Request) -> Standing | None:
    """Of the exhausted budgets that hold this request, the one that resets last (the task waits for
    every one of them: a month's spent budget outlasts a day's), or None."""
    holding_it = [standing for standing in exhausted if standing.budget.holds(req)]
    return max(holding_it, key=lambda standing: standing.resets, default=None)


def utc_today() -> date:
    return datetime.now(UTC).date()


# ------------------------------------------------------------------ the admin's writes
async def _check_user(redis: aioredis.Redis, name: str) -> None:
    if name != ADMIN and not await redis.hexists(keys.USERS, name):
        raise NotFound(f"user {name!r} not found; add it first with `mloc users add {name}`")


def budgets_of(
    period: str, limits: Mapping[str, str | float | None], *, gpu_model: str | None = None, hard: bool = False
) -> list[Budget]:
    """The budgets a request sets, all checked before any is stored (see :func:`check_limits`)."""
    per, amounts, model = check_limits(period, limits, gpu_model)
    return [
        Budget(metric, per, amount, hard, model if metric is Metric.GPU_TIME else None)
        for metric, amount in amounts.items()
    ]


async def set_budgets(redis: aioredis.Redis, name: str, budgets: Sequence[Budget]) -> None:
    """Store budgets (replacing one of the same metric, model and period) and wake the schedulers,
    so waiting tasks a raised budget lets go start at the next pass."""
    await _check_user(redis, name)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.user_budget(name), mapping={b.field: b.encode() for b in budgets})
    if any(b.hard for b in budgets):
        pipe.sadd(keys.BUDGETS_HARD, name)
    pipe.publish(keys.SCHEDULER_WAKE, "budget")
    await pipe.execute()


async def remove_budgets(
    redis: aioredis.Redis, name: str, *, metric: str | None = None, period: str | None = None
) -> list[str]:
    """Remove a user's budgets of one metric and/or period (all when neither is given); returns the
    fields removed."""
    await _check_user(redis, name)
    for value, kind, allowed in ((metric, "metric", Metric), (period, "period", Period)):
        if value is not None and value not in {m.value for m in allowed}:
            raise BadRequest(f"{kind} {value!r} is not one of {', '.join(m.value for m in allowed)}")
    stored = await redis.hgetall(keys.user_budget(name))
    gone = []
    for field, value in stored.items():
        budget = Budget.decode(field, value)
        if budget is None:
            continue
        if (metric is None or budget.metric == metric) and (period is None or budget.period == period):
            gone.append(field)
    if gone:
        pipe = redis.pipeline(transaction=True)
        pipe.hdel(keys.user_budget(name), *gone)
        pipe.publish(keys.SCHEDULER_WAKE, "budget")
        await pipe.execute()
    return sorted(gone)
