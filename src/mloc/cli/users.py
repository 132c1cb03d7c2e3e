"""`mloc users`: add, list and remove API users and set their quotas (admin)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

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
    """Remove a user; its token stops working at once."""
    try:
        client().remove_user(name)
    except MlocError as exc:
        output.fail(exc)
    output.line(output.visible(f"removed user {name}", one_line=True))
