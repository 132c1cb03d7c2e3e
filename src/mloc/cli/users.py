"""`mloc users`: add, list and remove API users, rotate their tokens and set their quotas, budgets and
weights (admin)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mloc import budgetunits
from mloc.cli import output
from mloc.cli.output import JsonFlag, OutputFormat, Quiet, wants_json
from mloc.cli.root import client, users_app
from mloc.errors import MlocError

MaxTasks = Annotated[
    int | None, typer.Option("--max-tasks", min=0, help="Tasks assigned or running at once (0 = unlimited).")
]
MaxGpus = Annotated[int | None, typer.Option("--max-gpus", min=0, help="GPUs held at once (0 = unlimited).")]


def _limit(value: int, is_default: bool) -> str:
    text = "unlimited" if value == 0 else str(value)
    return f"{text} (default)" if is_default else text


def _limits(quota: dict[str, Any]) -> tuple[str, str]:
    return (
        _limit(quota["max_tasks"], quota["max_tasks_is_default"]),
        _limit(quota["max_gpus"], quota["max_gpus_is_default"]),
    )


@users_app.command("add")
def users_add(name: str, max_tasks: MaxTasks = None, max_gpus: MaxGpus = None) -> None:
    """Create a user and print its token (shown once); optionally with its own quota."""
    try:
        answer = client().add_user(name, max_tasks=max_tasks, max_gpus=max_gpus)
    except MlocError as exc:
        output.fail(exc)
    tasks, gpus = _limits(answer["quota"])
    output.line(output.visible(f"user {answer['name']} created (max tasks {tasks}, max GPUs {gpus})", one_line=True))
    output.line("token (shown once):")
    output.line(answer["token"])


@users_app.command("set-quota")
def users_set_quota(
    name: str,
    max_tasks: MaxTasks = None,
    max_gpus: MaxGpus = None,
    reset: Annotated[bool, typer.Option("--reset", help="Return both limits to the defaults first.")] = False,
) -> None:
    """Set a user's limits; the next task placed obeys them (running tasks are not stopped)."""
    if max_tasks is None and max_gpus is None and not reset:
        output.die("give --max-tasks N and/or --max-gpus N (0 = unlimited), or --reset")
    try:
        answer = client().set_quota(name, max_tasks=max_tasks, max_gpus=max_gpus, reset=reset)
    except MlocError as exc:
        output.fail(exc)
    (tasks, gpus), usage = _limits(answer["quota"]), answer["usage"]
    output.line(
        output.visible(
            f"{answer['name']}: max tasks {tasks} ({usage['tasks']} in use), max GPUs {gpus} ({usage['gpus']} in use)",
            one_line=True,
        )
    )


@users_app.command("list")
def users_list(json_out: JsonFlag = False, fmt: OutputFormat = None, quiet: Quiet = False) -> None:
    """Users with their quotas and what they hold now."""
    try:
        body = client().users()
    except MlocError as exc:
        output.fail(exc)
    if wants_json(json_out, fmt):
        output.print_json(body)
        return
    if quiet:
        for item in body["items"]:
            output.line(output.visible(item["name"], one_line=True))
        return
    grid = output.table("USER", "CREATED", "TASKS (IN USE / MAX)", "GPUS (IN USE / MAX)")
    # A user name is what the next command takes (set-quota, remove), as a task id is in `mloc tasks`.
    output.keep_whole(grid, 0, (output.visible(item["name"], one_line=True) for item in body["items"]))
    for item in body["items"]:
        quota, usage = item["quota"], item["usage"]
        tasks, gpus = _limits(quota)
        grid.add_row(
            output.cell(item["name"]),
            output.ago(item.get("created_at")),
            f"{usage['tasks']} / {tasks}",
            f"{usage['gpus']} / {gpus}",
        )
    output.show(grid)


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Remove a user: its token stops working at once and its tasks not yet started are cancelled;
    its running tasks finish (`mloc cancel ID` stops one)."""
    try:
        answer = client().remove_user(name)
    except MlocError as exc:
        output.fail(exc)
    cancelled, running = answer.get("cancelled") or [], answer.get("running") or []
    output.line(output.visible(f"removed user {name}; its token no longer works", one_line=True))
    if cancelled:
        output.line(output.visible(f"cancelled {_tasks(len(cancelled))} not yet started", one_line=True))
    if running:
        ids = " ".join(running)
        output.line(
            output.visible(f"{_tasks(len(running))} still running, left to finish ({ids}); `mloc cancel ID` stops one")
        )


@users_app.command("rotate-token")
def users_rotate_token(name: str) -> None:
    """Issue a new token for a user and revoke the old one at once; quota, budgets and weight stay."""
    try:
        answer = client().rotate_token(name)
    except MlocError as exc:
        output.fail(exc)
    output.line(output.visible(f"user {answer['name']}: new token issued; the old one no longer works", one_line=True))
    output.line("token (shown once):")
    output.line(answer["token"])


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


TokenAmount = Annotated[str | None, typer.Option(help="Tokens: 1M, 500k, 2G or a plain number.", show_default=False)]
TimeAmount = Annotated[str | None, typer.Option(help="Seconds: 10h, 90m, 45s or a plain number.", show_default=False)]


@users_app.command("set-budget")
def users_set_budget(
    name: str,
    tokens: TokenAmount = None,
    tokens_in: TokenAmount = None,
    tokens_out: TokenAmount = None,
    gpu_time: TimeAmount = None,
    gpu_model: Annotated[
        str | None, typer.Option("--gpu-model", help="--gpu-time counts this GPU model only (A100).")
    ] = None,
    cpu_time: TimeAmount = None,
    per: Annotated[str, typer.Option("--per", help="The UTC period the limits cover: day or month.")] = "month",
    hard: Annotated[
        bool, typer.Option("--hard", help="Also cancel the user's running tasks once over (default: they finish).")
    ] = False,
) -> None:
    """Limit what a user spends per UTC day or month: tokens (in, out or both), GPU time, CPU time.
    Over a budget, the user's new tasks wait until it is raised or the period turns."""
    limits = {
        "tokens": tokens,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "gpu_time": gpu_time,
        "cpu_time": cpu_time,
    }
    if not any(limits.values()):
        flags = ", ".join("--" + name.replace("_", "-") for name in limits)
        output.die(f"give at least one limit to set: {flags} (for example --tokens 2M)", code=2)
    try:
        # Checked here first, so a typo is explained before anything is sent.
        budgetunits.check_limits(per, limits, gpu_model)
        answer = client().set_budget(name, period=per, hard=hard, gpu_model=gpu_model, **limits)
    except MlocError as exc:
        output.fail(exc)
    _show_budgets(answer)


@users_app.command("budget")
def users_budget(name: str, json_out: JsonFlag = False, fmt: OutputFormat = None) -> None:
    """A user's budgets: what they spent this day or month against each, and when it resets."""
    try:
        answer = client().budgets(name)
    except MlocError as exc:
        output.fail(exc)
    if wants_json(json_out, fmt):
        output.print_json(answer)
        return
    _show_budgets(answer)


@users_app.command("remove-budget")
def users_remove_budget(
    name: str,
    metric: Annotated[
        str | None, typer.Option(help="Only this metric: tokens, tokens_in, tokens_out, gpu_time, cpu_time.")
    ] = None,
    per: Annotated[str | None, typer.Option("--per", help="Only this period: day or month.")] = None,
) -> None:
    """Remove a user's budgets (all, or those of one metric and/or period); their tasks wait no more."""
    try:
        answer = client().remove_budget(name, metric=metric, period=per)
    except MlocError as exc:
        output.fail(exc)
    removed = ", ".join(answer["removed"]) or "nothing (no such budget)"
    output.line(output.visible(f"{answer['name']}: removed {removed}", one_line=True))
    _show_budgets(answer)


# A negative weight is an argument to refuse with a reason, not an unknown option.
@users_app.command("set-weight", context_settings={"ignore_unknown_options": True})
def users_set_weight(name: str, weight: str) -> None:
    """Set a user's fair-share weight: 2 gets twice the share of a user at 1 when both wait."""
    try:
        value = budgetunits.check_weight(_number(weight))
        answer = client().set_weight(name, value)
    except MlocError as exc:
        output.fail(exc)
    output.line(output.visible(f"{answer['name']}: fair-share weight {answer['weight']:g}", one_line=True))


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _show_budgets(answer: dict[str, Any]) -> None:
    rows = answer.get("budgets") or []
    if not rows:
        output.line(output.visible(f"{answer['name']}: no budgets", one_line=True))
        return
    grid = output.table("BUDGET", "PER", "SPENT OF LIMIT", "HARD", "RESETS", title=f"{answer['name']}: budgets")
    for row in rows:
        what = f"{row['metric']} ({row['gpu_model']})" if row.get("gpu_model") else row["metric"]
        metric = budgetunits.Metric(row["metric"])
        spent = (
            f"{budgetunits.format_amount(metric, row['spent'])} of {budgetunits.format_amount(metric, row['limit'])}"
        )
        if row["exhausted"]:
            spent += " (exhausted)"
        grid.add_row(output.cell(what), row["period"], spent, "yes" if row["hard"] else "no", row["resets"])
    output.show(grid)
