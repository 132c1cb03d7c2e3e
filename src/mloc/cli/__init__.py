"""The `mloc` command line: `app` (Typer) and `main` (the console script).

Commands live in modules named for what they act on (tasks, artifacts, workers, users, stats, local
clusters, task files); `output` holds how everything is printed. `start` stays here: this launcher
module is the one that may start either side of the dependency rule (docs/architecture.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

from mloc.cli import artifacts, backups, evals, lines, servers, specs, stats, tasks, users, workers  # noqa: F401  (they register commands)
from mloc.cli.output import error_line, plain_help
from mloc.cli.root import app
from mloc.errors import ConfigError
from mloc.settings import NodeType, Settings, get_settings

__all__ = ["app", "main"]


def _settings() -> Settings:
    """The settings, or one line per bad variable with the fix."""
    try:
        return get_settings()
    except ConfigError as exc:
        error_line(exc.message)
        raise typer.Exit(2) from None


@app.command()
def start(
    node_type: Annotated[
        str | None, typer.Option("--node-type", help="orchestrator or worker (default: MLOC_NODE_TYPE).")
    ] = None,
) -> None:
    """Run an orchestrator or a worker in the foreground (Ctrl-C stops it).

    With no REDIS_URL / MLOC_REDIS_URL it uses a Redis answering at redis://localhost:6379, else the
    embedded one (started here when none runs yet), and logs which."""
    settings = _settings()
    try:
        chosen = NodeType((node_type or settings.node_type).upper())
    except ValueError:
        error_line(f"--node-type must be orchestrator or worker, not {node_type!r}")
        raise typer.Exit(2) from None
    if chosen == NodeType.WORKER:
        from mloc.worker.listener import main as worker_main

        worker_main()
        return
    from mloc.orchestrator.server import main as orchestrator_main

    orchestrator_main()


def main() -> None:
    plain_help()
    try:
        app()
    except ConfigError as exc:
        error_line(exc.message)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
