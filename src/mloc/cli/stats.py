"""`mloc stats`: usage per user over a range of UTC days, a row per day (or week, month)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import typer

from mloc import budgetunits
from mloc.cli import output
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import app, client
from mloc.errors import MlocError

DATE_FORMS = "YYYY-MM-DD, today, yesterday, or Nd for N days ago (7d)"
# The counters shown per period (all counters are in the totals table).
PERIOD_COUNTERS = (
    "tasks",
    "wall_sec",
    "cpu_seconds",
    "gpu_seconds",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
_DAYS_AGO = re.compile(r"^(\d{1,5})d$")


class Grouping(StrEnum):
    """The API's group_by values."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"


def parse_day(text: str, today: date | None = None) -> date:
    """A UTC day from 'YYYY-MM-DD', 'today', 'yesterday' or 'Nd' (N days ago)."""
    today = today or datetime.now(UTC).date()
    value = text.strip().lower()
    if value == "today":
        return today
    if value == "yesterday":
        return today - timedelta(days=1)
    if match := _DAYS_AGO.match(value):
        return today - timedelta(days=int(match.group(1)))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a day; give {DATE_FORMS}") from None


def _day_option(value: str | None) -> str | None:
    return None if value is None else parse_day(value).isoformat()


@app.command()
def stats(
    user: Annotated[str | None, typer.Option(help="One user's usage; default: every user you may see.")] = None,
    start_date: Annotated[
        str | None,
        typer.Option(
            "--start-date",
            "--since",
            callback=_day_option,
            help=f"First UTC day: {DATE_FORMS} (default: 29 days before the end).",
        ),
    ] = None,
    end_date: Annotated[
        str | None,
        typer.Option("--end-date", callback=_day_option, help=f"Last UTC day: {DATE_FORMS} (default: today)."),
    ] = None,
    group_by: Annotated[
        Grouping,
        typer.Option("--group-by", help="A row per day, ISO week (2026-W48), month (2026-11), or none (total)."),
    ] = Grouping.DAY,
    after: Annotated[
        str | None, typer.Option(help="Every user, next page: start after this user (as the last page said).")
    ] = None,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """Usage per user over UTC days (YYYY-MM-DD, today, yesterday, 7d): a row per day, then the totals."""
    if start_date and end_date and start_date > end_date:  # ISO days, as _day_option wrote them
        output.die(f"--start-date {start_date} is after --end-date {end_date}; swap them", code=2)
    try:
        body = client().stats(user=user, start_date=start_date, end_date=end_date, group_by=group_by.value, after=after)
    except MlocError as exc:
        output.fail(exc)
    if wants_json(json_out, fmt):
        output.print_json(body)
        return
    span = f"{body['start_date']} .. {body['end_date']}"
    for entry in body["users"]:
        _user_tables(entry, span, group_by)
    if not body["users"]:
        output.line(f"no usage recorded in {span}")
    if body.get("next_after"):
        output.line(
            output.visible(f"more users: run again with --after {body['next_after']}", one_line=True), stderr=True
        )


def _user_tables(entry: dict[str, Any], span: str, group_by: Grouping) -> None:
    name = output.visible(entry["user"], one_line=True)
    rows = entry.get("days") or entry.get("periods") or []
    totals: dict[str, Any] = entry.get("totals") or {}
    if not rows and not totals:
        output.line(f"{name}: no usage recorded in {span}")
    elif rows:
        shown = [c for c in PERIOD_COUNTERS if c in totals]
        grid = output.table(
            "DATE" if group_by is Grouping.DAY else group_by.value.upper(),
            *(c.upper() for c in shown),
            title=f"{name}: {span}, per {group_by.value}",
        )
        for column in grid.columns[1:]:
            column.justify = "right"
        for row in rows:
            label = row.get("date") or row.get("period") or ""
            grid.add_row(output.cell(label), *(output.amount(row.get(c, 0)) for c in shown))
        output.show(grid)
    if totals:
        grid = output.table("COUNTER", "TOTAL", title=f"{name}: {span}, totals")
        grid.columns[1].justify = "right"
        for counter, value in sorted(totals.items()):
            grid.add_row(output.cell(counter), output.amount(value))
        output.show(grid)
    if entry.get("budgets"):
        _budget_table(name, entry["budgets"])


def _budget_table(name: str, rows: list[dict[str, Any]]) -> None:
    """Spend against each budget in its current day or month (whatever range the report covers)."""
    grid = output.table("BUDGET", "PER", "SPENT", "LIMIT", "LEFT", "RESETS", title=f"{name}: budgets")
    for column in grid.columns[2:5]:
        column.justify = "right"
    for row in rows:
        metric = budgetunits.Metric(row["metric"])
        what = f"{metric.value} ({row['gpu_model']})" if row.get("gpu_model") else metric.value
        if row.get("hard"):
            what += ", hard"
        left = "exhausted" if row["exhausted"] else budgetunits.format_amount(metric, row["limit"] - row["spent"])
        grid.add_row(
            output.cell(what),
            row["period"],
            budgetunits.format_amount(metric, row["spent"]),
            budgetunits.format_amount(metric, row["limit"]),
            left,
            row["resets"],
        )
    output.show(grid)
