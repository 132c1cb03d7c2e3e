"""`mloc results`: a dataset task's result lines (results.jsonl), a page at a time, while it runs or after."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from mloc.cli import output, results
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import TaskIdArg, app, client, task_failed
from mloc.client import ApiError, Client
from mloc.errors import MlocError

DEFAULT_LIMIT = 20
# The orchestrator's refusal for a task that writes no lines (mloc.api.results.open_lines); it names
# the HTTP route to use instead, which a CLI user should hear as a command.
_NO_LINES = re.compile(r"task ([0-9a-f-]{36}) has no result lines \(")


@app.command("results")
def results_command(
    task_id: TaskIdArg,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Lines to skip (0-based).")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help=f"Lines to print at most (default {DEFAULT_LIMIT}).")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Print every line from --offset on (for scripts); not with --limit.")
    ] = False,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """A dataset inference task's result lines: id, how each ended and its output (or error).

    At most --limit lines (default 20) are printed; when that many came, a note on stderr gives the
    --offset of the next page (and, once the task has succeeded, how many lines are left). --all prints
    every line instead. --json prints the lines as they are, one JSON object a line (NDJSON), for jq and
    scripts; notes go to stderr, so stdout stays NDJSON."""
    if every and limit is not None:
        output.die("give --all or --limit, not both")
    page = None if every else limit or DEFAULT_LIMIT
    api = client()
    as_json = wants_json(json_out, fmt)
    shown = 0
    try:
        # The client streams the whole range in one request (the orchestrator sends it in blocks), so
        # --all holds no more in memory than a page does.
        for line in api.result_lines(task_id, offset=offset, limit=page):
            shown += 1
            if as_json:
                output.json_line(line)
            else:
                results.print_line(line)
    except MlocError as exc:
        no_lines = _NO_LINES.match(exc.message) if isinstance(exc, ApiError) and exc.status_code == 409 else None
        if no_lines:
            said = no_lines.group(1)
            output.die(
                f"task {said} is not a dataset task, so it has no result lines (only inference tasks that read a "
                f"dataset, inference.input, write them); `mloc result {said}` prints its result"
            )
        task_failed(api, task_id, exc)
    # A full page may not be the last: said on stderr even with --json, where a script would otherwise
    # take a cut list for the whole.
    if shown == page:
        left = _lines_left(api, task_id, offset + shown)
        if left != 0:
            more = "more may follow" if left is None else f"{left:,} more"
            output.line(
                output.styled(f"... {more}: --offset {offset + shown} (or --all for every line)", "dim"), stderr=True
            )
    elif shown == 0 and not as_json:
        output.line(output.styled(f"no result lines from line {offset} on", "dim"), stderr=True)


def _lines_left(api: Client, task_id: str, after: int) -> int | None:
    """How many lines come after the first ``after``: known once the task succeeded (its summary counts
    its rows); None while it runs (more are being written) or when it did not say."""
    try:
        record = api.task(task_id)
    except MlocError:
        return None
    rows = (record.get("result_summary") or {}).get("rows")
    if record.get("state") != "succeeded" or not isinstance(rows, int):
        return None
    return max(0, rows - after)
