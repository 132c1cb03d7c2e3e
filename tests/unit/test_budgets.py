"""Budget amounts as the admin types them, what a budget holds back, and the reason a task shows."""

from __future__ import annotations

import shlex
from datetime import date, timedelta

import pytest
import typer

from mloc.budgetunits import Metric, Period, check_limits, format_amount, parse_limit
from mloc.cli.users import users_app  # importing this module registers the users commands
from mloc.errors import BadRequest
from mloc.orchestrator.budgets import Budget, Standing, budgets_of, holding, period_bounds, standings
from mloc.orchestrator.placement import Request


@pytest.mark.parametrize(
    ("metric", "text", "amount"),
    [
        (Metric.TOKENS, "1M", 1_000_000),
        (Metric.TOKENS, "1.5k", 1_500),
        (Metric.TOKENS_IN, "2G", 2_000_000_000),
        (Metric.TOKENS_OUT, "250000", 250_000),
        (Metric.TOKENS, " 500 K ", 500_000),
        (Metric.GPU_TIME, "10h", 36_000),
        (Metric.GPU_TIME, "90m", 5_400),
        (Metric.CPU_TIME, "45s", 45),
        (Metric.CPU_TIME, "3600", 3_600),
        (Metric.CPU_TIME, 7.5, 7.5),
        (Metric.TOKENS, 0, 0),
    ],
)
def test_amounts_take_the_units_of_their_metric(metric: Metric, text: str | float, amount: float) -> None:
    assert parse_limit(metric, text) == amount


@pytest.mark.parametrize(
    ("metric", "text", "message"),
    [
        (Metric.TOKENS, "5T", "tokens budget '5T': unknown unit 'T'; use k, M or G (1M = 1,000,000 tokens)"),
        (Metric.TOKENS, "3h", "unknown unit 'h'; use k, M or G"),
        (Metric.GPU_TIME, "2d", "gpu_time budget '2d': unknown unit 'd'; use s, m or h (10h = 36,000 seconds)"),
        (Metric.CPU_TIME, "1M", "unknown unit 'M'; use s, m or h"),
        (Metric.TOKENS, "lots", "tokens budget 'lots' is not an amount; give a number with k, M or G"),
        (Metric.TOKENS, -1, "is negative or not a number; give 0 or more"),
        (Metric.GPU_TIME, float("nan"), "is negative or not a number"),
        (Metric.TOKENS, "2000000G", "is more than 1e+15; check the unit"),
    ],
)
def test_an_unknown_unit_or_a_bad_amount_is_refused_naming_what_is_allowed(
    metric: Metric, text: str | float, message: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_limit(metric, text)
    assert message in refused.value.message


def test_a_request_with_one_bad_part_sets_nothing() -> None:
    with pytest.raises(BadRequest, match="unknown unit 'x'"):
        check_limits("month", {"tokens": "1M", "gpu_time": "3x"})
    with pytest.raises(BadRequest, match="period 'week' is not one of day, month"):
        check_limits("week", {"tokens": "1M"})
    with pytest.raises(BadRequest, match="give at least one of tokens"):
        check_limits("day", {"tokens": None})
    with pytest.raises(BadRequest, match="'gpus' is not a budget metric; use tokens, tokens_in"):
        check_limits("day", {"gpus": "1"})
    with pytest.raises(BadRequest, match="gpu_model names the GPU model of a gpu_time budget; give gpu_time too"):
        check_limits("day", {"tokens": "1M"}, "A100")
    per, amounts, model = check_limits("day", {"gpu_time": "2h", "tokens": None}, " A100 ")
    assert (per, amounts, model) == (Period.DAY, {Metric.GPU_TIME: 7200.0}, "A100")
    made = budgets_of("month", {"tokens": "1M", "gpu_time": "1h"}, gpu_model="A100", hard=True)
    assert {b.field for b in made} == {"tokens/month", "gpu_time:A100/month"}
    assert all(b.hard for b in made)


@pytest.mark.parametrize(
    ("metric", "amount", "text"),
    [
        (Metric.TOKENS, 1_020_000, "1.02M"),
        (Metric.TOKENS, 1_000_000, "1M"),
        (Metric.TOKENS, 350_000, "350k"),
        (Metric.TOKENS, 999, "999"),
        (Metric.GPU_TIME, 7_380, "2.05h"),
        (Metric.GPU_TIME, 750, "12.5m"),
        (Metric.CPU_TIME, 45, "45s"),
    ],
)
def test_amounts_are_shown_as_people_read_them(metric: Metric, amount: float, text: str) -> None:
    assert format_amount(metric, amount) == text


def test_a_period_resets_on_the_next_utc_day_or_the_first_of_the_next_month() -> None:
    today = date.today()
    assert period_bounds(Period.DAY, today) == ("today", today + timedelta(days=1))
    words, resets = period_bounds(Period.MONTH, today)
    assert words == "this month" and resets.day == 1 and 1 <= (resets - today).days <= 31
    assert resets.month == today.month % 12 + 1
    # The year turns with December.
    december = date(today.year, 12, 17)
    assert period_bounds(Period.MONTH, december)[1] == date(today.year + 1, 1, 1)


def test_spend_sums_the_counters_of_the_budgets_period() -> None:
    today = date.today()
    stored = [
        "tokens/month",
        Budget(Metric.TOKENS, Period.MONTH, 1e6).encode(),
        "tokens_out/day",
        Budget(Metric.TOKENS_OUT, Period.DAY, 100).encode(),
        "gpu_time:A100/month",
        Budget(Metric.GPU_TIME, Period.MONTH, 3600, hard=True, gpu_model="A100").encode(),
        "someday/decade",  # a field a later version might write: left alone
        "{}",
    ]
    day = ["prompt_tokens", "10", "completion_tokens", "90", "gpu_seconds", "5"]
    month = [
        "prompt_tokens",
        "20000",
        "completion_tokens",
        "1000000",
        "gpu_seconds.NVIDIA A100-SXM4-80GB",
        "4000",
        "gpu_seconds.NVIDIA L4",
        "99",
    ]
    found = {s.budget.field: s for s in standings(stored, day, month, today)}
    assert set(found) == {"tokens/month", "tokens_out/day", "gpu_time:A100/month"}
    assert found["tokens/month"].spent == 1_020_000 and found["tokens/month"].exhausted
    assert found["tokens_out/day"].spent == 90 and not found["tokens_out/day"].exhausted
    assert found["gpu_time:A100/month"].spent == 4000 and found["gpu_time:A100/month"].exhausted
    _, month_resets = period_bounds(Period.MONTH, today)
    assert found["tokens/month"].reason == (
        f"budget exhausted: 1.02M of 1M tokens this month; resets {month_resets.isoformat()}"
    )
    assert found["gpu_time:A100/month"].reason == (
        f"budget exhausted (hard limit): 1.11h of 1h GPU time on A100 this month; resets {month_resets.isoformat()}"
    )


def test_an_exhausted_gpu_budget_holds_only_the_gpu_tasks_it_covers() -> None:
    today = date.today()
    gpu = Standing(Budget(Metric.GPU_TIME, Period.DAY, 10), 11, today)
    a100 = Standing(Budget(Metric.GPU_TIME, Period.DAY, 10, gpu_model="A100"), 11, today)
    tokens = Standing(Budget(Metric.TOKENS, Period.DAY, 10), 11, today)
    cpu_task = Request("echo", "tasks.echo")
    any_gpu = Request("echo", "tasks.echo", gpu_count=1)
    l4_task = Request("echo", "tasks.echo", gpu_count=1, gpu_type="L4")
    a100_task = Request("echo", "tasks.echo", gpu_count=2, gpu_type="a100-80gb")
    assert holding([gpu], cpu_task) is None
    assert holding([gpu], l4_task) == gpu.reason
    assert holding([a100], l4_task) is None
    assert holding([a100], a100_task) == a100.reason
    assert holding([a100], any_gpu) == a100.reason  # it may land on an A100
    assert holding([a100, tokens], cpu_task) == tokens.reason


def test_a_budget_held_task_is_told_the_command_that_raises_that_budget() -> None:
    today = date(2026, 3, 14)
    tokens = Standing(Budget(Metric.TOKENS, Period.MONTH, 1_000_000), 1_020_000, today)
    assert tokens.waiting_reason("alice") == (
        "budget exhausted: 1.02M of 1M tokens this month; resets 2026-04-01; it starts then, or once an admin "
        "raises the budget: `mloc users set-budget alice --tokens N --per month`"
    )
    gpu = Standing(Budget(Metric.GPU_TIME, Period.DAY, 3600, hard=True, gpu_model="A100"), 4000, today)
    cpu_task = Request("echo", "tasks.echo")
    gpu_task = Request("echo", "tasks.echo", gpu_count=1, gpu_type="A100")
    # Without an owner the bare reason, as a cancel gives it; a waiting task of the owner gets the command.
    assert holding([gpu], gpu_task) == gpu.reason
    assert holding([gpu], gpu_task, owner="bob") == gpu.waiting_reason("bob")
    assert holding([gpu], cpu_task, owner="bob") is None
    # Setting a budget replaces it whole: the command keeps its model, period and hard limit.
    assert gpu.waiting_reason("bob").endswith(
        "`mloc users set-budget bob --gpu-time N --gpu-model A100 --per day --hard`"
    )
    group = typer.main.get_command(users_app)
    assert isinstance(group, typer.core.TyperGroup)
    for reason, amount in ((tokens.waiting_reason("alice"), "2M"), (gpu.waiting_reason("bob"), "2h")):
        args = [amount if arg == "N" else arg for arg in shlex.split(reason.rsplit("`", 2)[-2])[3:]]
        group.commands["set-budget"].make_context("set-budget", args)  # the CLI takes it as written
