"""Backups: `mloc backup FILE` (a snapshot of MLOC's Redis while it runs) and `mloc restore FILE` (into this
MLOC_HOME's embedded Redis, while MLOC is stopped). :mod:`mloc.backup` does the work; this prints it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mloc.cli import output
from mloc.cli.root import app
from mloc.errors import ConfigError, MlocError
from mloc.settings import get_settings
from mloc.state import TaskState

Timeout = Annotated[float, typer.Option(min=1, help="Seconds a Redis server gets to write or load the snapshot.")]


def _tasks_text(counts: dict[str, int] | None, keys: int | None) -> str:
    """'4 tasks (3 succeeded, 1 pending) in 57 keys', or '' where the snapshot was not loaded."""
    if keys is None:
        return ""
    if counts is None:
        return f"{keys} keys"
    total = sum(counts.values())
    parts = [f"{counts[state]} {state}" for state in TaskState if counts.get(state)]
    tasks = f"{total} task{'s' if total != 1 else ''}" + (f" ({', '.join(parts)})" if parts else "")
    return f"{tasks} in {keys} keys"


@app.command()
def backup(
    file: Annotated[Path, typer.Argument(help="Where to write the snapshot (an .rdb file).")],
    force: Annotated[bool, typer.Option("--force", help="Replace FILE when it exists.")] = False,
    timeout: Timeout = 600,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Load the copy in a private server to check it.")
    ] = True,
) -> None:
    """Write a point-in-time snapshot of MLOC's Redis (tasks, results, users, usage) to FILE while MLOC runs.

    The Redis is the one MLOC uses here: REDIS_URL / MLOC_REDIS_URL, else the embedded Redis of MLOC_HOME. It
    writes a snapshot (BGSAVE), FILE gets a copy, complete or not at all, and the copy is loaded once to check
    it. The copy is read from the Redis's data folder, so this works for a Redis on this machine; for one on
    another host use `redis-cli --rdb FILE` or the provider's snapshots. Result files (RESULTS_DIR) and model
    caches are not in it: copy them apart. `mloc restore FILE` puts it back (docs/operations.md)."""
    # Imported here: every `mloc` command would otherwise pay for loading the task store and its scripts.
    from mloc import backup as rdb
    from mloc.connection import DEFAULT_URL, resolve_url

    settings = get_settings()
    try:
        url = resolve_url(settings)
    except ConfigError:
        output.die(
            f"no Redis to back up: no REDIS_URL is set, no embedded Redis runs for MLOC_HOME {settings.home} and "
            f"nothing answers at {DEFAULT_URL}; start MLOC (`mloc up`) and back up again, or set REDIS_URL to the "
            "Redis MLOC uses"
        )
    where = rdb.where_of(url, settings.home)
    try:
        with output.err().status(f"backing up {where}..."):
            written = rdb.backup(url, file, settings=settings, where=where, force=force, timeout=timeout, verify=verify)
    except MlocError as exc:
        output.fail(exc)
    held = _tasks_text(written.tasks, written.keys) or "not loaded to check it (--no-verify)"
    output.line(
        output.visible(
            f"wrote {written.path}: {output.size(written.size)} ({written.size} bytes), {held}; a snapshot of {where}",
            one_line=True,
        )
    )
    output.line(
        output.visible(
            f"restore it with `mloc restore {written.path}` while MLOC is stopped; result files (RESULTS_DIR) and "
            "model caches are not in it",
            one_line=True,
        ),
        stderr=True,
    )


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(help="A snapshot `mloc backup` (or `redis-cli --rdb`) wrote.")],
    timeout: Timeout = 600,
) -> None:
    """Make FILE the data of this MLOC_HOME's embedded Redis, while MLOC is stopped (`mloc down` first).

    FILE is checked first: one that is missing, not a Redis snapshot or does not load changes nothing. A
    private server loads it and writes it as append-only files, which take the place of
    MLOC_HOME/redis/appendonlydir; the data they replace is kept beside them
    (appendonlydir.before-restore-TIME), never deleted. The next `mloc up` serves the restored tasks; tasks
    that were running when the snapshot was taken go back to the queue. Result files (RESULTS_DIR) are
    restored apart (docs/operations.md)."""
    from mloc import backup as rdb
    from mloc.connection import redact

    settings = get_settings()
    try:
        with output.err().status(f"restoring {file} into {settings.home}..."):
            restored = rdb.restore(settings.home, file, timeout=timeout)
    except MlocError as exc:
        output.fail(exc)
    output.line(
        output.visible(
            f"restored {file} into {restored.data}: {_tasks_text(restored.tasks, restored.keys)}", one_line=True
        )
    )
    if restored.kept is not None:
        output.line(
            output.visible(
                f"the data it replaced is kept in {restored.kept}: to go back, stop MLOC and put that folder back "
                f"as {rdb.AOF_DIR}; delete it once the restored data is checked",
                one_line=True,
            )
        )
    else:
        output.line(output.visible(f"there was no earlier data in {restored.data} to keep", one_line=True))
    if settings.redis_url:
        output.line(
            f"note: {settings.redis_url_variable} is set ({redact(settings.redis_url)}): MLOC started with it uses "
            "that Redis, not the embedded one restored here; unset it before `mloc up`",
            stderr=True,
        )
    output.line("start MLOC with `mloc up`: it serves the restored tasks")
