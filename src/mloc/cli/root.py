"""The `mloc` Typer application that every command module registers on."""

from __future__ import annotations

import typer

from mloc.cli import output
from mloc.client import Client
from mloc.errors import MlocError

app = typer.Typer(
    help="MLOC: run LLM inference, fine-tuning, RLHF, RAG and agent tasks on a worker fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage API users (admin).", no_args_is_help=True)
app.add_typer(users_app, name="users")
workers_app = typer.Typer(
    help="List workers (hardware, free capacity, warm models), or remove stopped ones.",
    invoke_without_command=True,
)
app.add_typer(workers_app, name="workers")


def client() -> Client:
    """A client for MLOC_API_URL with MLOC_TOKEN / ORCHESTRATOR_TOKEN, as `Client()` reads them."""
    try:
        return Client()
    except MlocError as exc:
        output.fail(exc)
