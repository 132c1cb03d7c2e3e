"""`mloc results`: a dataset task's result lines (results.jsonl), a page at a time, while it runs or after."""

from __future__ import annotations

from typing import Annotated

import typer

from mloc.cli import output, results
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import TaskIdArg, app, client, task_failed
from mloc.errors import MlocError


@app.command("results")
def results_command(
    task_id: TaskIdArg,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Lines to skip (0-based).")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Lines to print at most.")] = 20,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """A dataset inference task's result lines: id, how each ended and its output (or error).

    --json prints the lines as they are, one JSON object a line (NDJSON), for jq and scripts."""
    api = client()
    as_json = wants_json(json_out, fmt)
    shown = 0
    try:
        for line in api.result_lines(task_id, offset=offset, limit=limit):
            shown += 1
            if as_json:
                output.json_line(line)
            else:
                results.print_line(line)
    except MlocError as exc:
        task_failed(api, task_id, exc)
    if not as_json:
        if shown == limit:
            output.line(output.styled(f"... more may follow: --offset {offset + shown}", "dim"), stderr=True)
        elif shown == 0:
            output.line(output.styled(f"no result lines from line {offset} on", "dim"), stderr=True)
