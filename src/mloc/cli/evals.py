"""`mloc eval compare`: eval tasks' scores side by side."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mloc.cli import output
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import app, client
from mloc.errors import MlocError

eval_app = typer.Typer(
    help="Evaluation results: compare eval tasks' scores.", no_args_is_help=True, rich_markup_mode="markdown"
)
app.add_typer(eval_app, name="eval")


@eval_app.command("compare")
def compare(
    task_ids: Annotated[
        list[str], typer.Argument(help="Two or more succeeded eval tasks: ids or unique prefixes of them.")
    ],
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """Eval tasks' scores side by side, with standard errors.

    For two tasks it also shows the difference and whether it exceeds two combined standard errors."""
    if len(task_ids) < 2:
        output.die("give at least two eval tasks to compare: mloc eval compare ID1 ID2")
    try:
        body = client().compare_evals(*task_ids)
    except MlocError as exc:
        output.fail(exc)
    if wants_json(json_out, fmt):
        output.print_json(body)
        return
    show(body)


def show(body: dict[str, Any]) -> None:
    runs = body["runs"]
    for number, run in enumerate(runs, start=1):
        adapter = f" + adapter {run['adapter']}" if run.get("adapter") else ""
        shots = "task default" if run.get("num_fewshot") is None else str(run["num_fewshot"])
        limit = "" if run.get("limit") is None else f", limit {run['limit']}"
        output.line(
            output.visible(
                f"[{number}] {run['task_id'][:8]} {run['name']}: {run.get('model')}{adapter} (few-shot {shots}{limit})",
                one_line=True,
            )
        )
    two = len(runs) == 2
    columns = ["TASK", "METRIC", *(f"[{number}]" for number in range(1, len(runs) + 1))]
    if two:
        columns += ["[2] - [1]", "> 2 SE"]
    grid = output.table(*columns)
    for row in body["rows"]:
        cells = [output.cell(row["task"]), output.cell(row["metric"])]
        cells += [output.cell(score(cell["value"], cell["stderr"])) for cell in row["cells"]]
        if two:
            difference = row.get("difference")
            cells.append(output.cell(score(difference, row.get("combined_stderr"), signed=True)))
            significant = row.get("significant")
            cells.append(output.cell("-" if significant is None else ("yes" if significant else "no")))
        grid.add_row(*cells)
    output.show(grid)


def score(value: float | None, stderr: float | None, *, signed: bool = False) -> str:
    """'0.5000 ± 0.1890', '+0.1250 ± 0.2500', or '-' where there is no value."""
    if value is None:
        return "-"
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text
