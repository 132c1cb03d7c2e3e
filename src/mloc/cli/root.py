"""The `mloc` Typer application that every command module registers on."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from mloc.cli import output
from mloc.client import ApiError, Client
from mloc.errors import MlocError

TaskIdArg = Annotated[str, typer.Argument(help="A task id, or any unique prefix of one (as `mloc tasks` shows).")]

app = typer.Typer(
    help="MLOC: run LLM inference, fine-tuning, RLHF, RAG and agent tasks on a worker fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help paragraphs reflow to the terminal's width (the "rich" mode keeps each docstring line break).
    rich_markup_mode="markdown",
)
users_app = typer.Typer(help="Manage API users (admin).", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(users_app, name="users")
workers_app = typer.Typer(
    help="List workers (hardware, free capacity, warm models), or remove stopped ones.",
    invoke_without_command=True,
    rich_markup_mode="markdown",
)
app.add_typer(workers_app, name="workers")


def client() -> Client:
    """A client for MLOC_API_URL with MLOC_TOKEN / ORCHESTRATOR_TOKEN, as `Client()` reads them."""
    try:
        return Client()
    except MlocError as exc:
        output.fail(exc)


def task_failed(api: Client, given: str, exc: MlocError) -> NoReturn:
    """The error of a command given a task id; a task id no task has is said in `mloc` terms (the
    orchestrator's words are for curl), and named as a pipeline's id where it is one."""
    task_id = given.strip().lower()
    if not (
        isinstance(exc, ApiError) and exc.status_code == 404 and exc.message.startswith(f"task {task_id} not found")
    ):
        output.fail(exc)
    try:
        api.pipeline(task_id)
    except MlocError:
        output.die(
            f"task {task_id} not found; `mloc tasks` lists yours (a finished task is removed "
            "MLOC_TASK_RETENTION_SEC after it ended, 30 days unless the orchestrator says otherwise)"
        )
    output.die(f"{task_id} is a pipeline's id, not a task's: `mloc pipeline {task_id}` shows its steps")
