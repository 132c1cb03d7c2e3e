"""/api/v1/evals/compare: eval tasks' scores side by side, each with its standard error.

Every score an eval task reported (its result's ``scores``: {task: {metric: value, metric_stderr: value}})
becomes one row of task x metric with a cell per run. For two runs a row also gives the difference (the
second minus the first), the combined standard error sqrt(se1² + se2²), and whether the difference
exceeds twice that: a rough test that the runs differ by more than the noise of the samples.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from mloc.api.deps import Caller, Orch
from mloc.api.responses import raises
from mloc.api.tasks import _own
from mloc.errors import BadRequest, Conflict, NotFound
from mloc.orchestrator.users import Principal
from mloc.records import TaskRecord
from mloc.state import TaskState

router = APIRouter(prefix="/api/v1/evals", tags=["evals"])

MAX_RUNS = 16
STDERR = "_stderr"
_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PREFIX = re.compile(r"^[0-9a-f-]{1,36}$")


class Run(BaseModel):
    """One compared eval task."""

    task_id: str
    name: str
    model: str | None = Field(None, description="The model the task scored.")
    adapter: str | None = Field(None, description="The LoRA adapter applied, if any.")
    num_fewshot: int | None = Field(None, description="The few-shot count the task asked for (unset: each task's own).")
    limit: int | None = Field(None, description="Rows scored at most per task (unset: all).")


class Cell(BaseModel):
    value: float | None = Field(None, description="The score; null where this run has none for the row.")
    stderr: float | None = Field(None, description="Its standard error, where lm-eval computed one.")


class Row(BaseModel):
    task: str
    metric: str
    cells: list[Cell] = Field(description="One per run, in the order the runs were named.")
    difference: float | None = Field(None, description="Two runs: the second's value minus the first's.")
    combined_stderr: float | None = Field(None, description="Two runs: sqrt(stderr1² + stderr2²).")
    significant: bool | None = Field(
        None,
        description="Two runs: |difference| > 2 * combined_stderr; null where that is 0 (every sample of both runs "
        "scored alike), which measures no spread.",
    )


class Comparison(BaseModel):
    ok: Literal[True] = True
    runs: list[Run]
    rows: list[Row]


@router.get("/compare", response_model=Comparison)
@raises(BadRequest, NotFound, Conflict)
async def compare(
    orch: Orch,
    who: Caller,
    tasks: Annotated[
        str,
        Query(
            min_length=1,
            max_length=MAX_RUNS * 37,
            description="Two or more succeeded eval tasks, comma separated: ids or unique prefixes of them.",
        ),
    ],
) -> Comparison:
    """Eval tasks' scores as a table of task x metric, with standard errors; for two runs, the
    difference and whether it exceeds two combined standard errors."""
    names = [part.strip().lower() for part in tasks.split(",") if part.strip()]
    if len(names) < 2:
        raise BadRequest("give at least two eval tasks to compare, comma separated: tasks=ID1,ID2")
    if len(names) > MAX_RUNS:
        raise BadRequest(f"at most {MAX_RUNS} eval tasks can be compared at once; you gave {len(names)}")
    task_ids = [await resolve(orch, who, name) for name in names]
    repeated = sorted({task_id for task_id in task_ids if task_ids.count(task_id) > 1})
    if repeated:
        raise BadRequest(f"task {repeated[0]} is named twice; compare different runs")
    runs: list[Run] = []
    scores: list[dict[str, Any]] = []
    for task_id in task_ids:
        record = _own(await orch.store.get(task_id, with_spec=False), who)
        result = finished_eval(record, await orch.store.result(task_id))
        config = result.get("config")
        config = config if isinstance(config, dict) else {}
        runs.append(
            Run(
                task_id=task_id,
                name=record.name,
                model=result.get("model"),
                adapter=result.get("adapter"),
                num_fewshot=config.get("num_fewshot"),
                limit=config.get("limit"),
            )
        )
        scores.append(result.get("scores") or {})
    return Comparison(runs=runs, rows=table(scores))


async def resolve(orch: Orch, who: Principal, text: str) -> str:
    """The caller's one task whose id is or starts with ``text``."""
    if _FULL_ID.match(text):
        return text
    if not _PREFIX.match(text):
        raise BadRequest(
            f"{text[:80]!r} is not a task id: ids are UUIDs (hex digits and '-'); give ids or unique prefixes of them"
        )
    found = await orch.store.ids_starting_with(text, None if who.admin else who.name, most=3)
    if not found:
        raise NotFound(f"no task of yours has an id starting with {text!r}; GET /api/v1/tasks lists them")
    if len(found) > 1:
        shown = ", ".join(sorted(found)[:3])
        raise BadRequest(f"task id prefix {text!r} is ambiguous: it matches {shown}; give more characters")
    return found[0]


def finished_eval(record: TaskRecord, result: Any) -> dict[str, Any]:
    """The result of a succeeded eval task; a clear refusal for any other."""
    label = f"task {record.task_id} ({record.name})"
    if record.task_type != "eval":
        raise Conflict(f"{label} has taskType {record.task_type!r}, not eval; compare eval tasks only")
    if record.state != TaskState.SUCCEEDED:
        if record.state in (TaskState.FAILED, TaskState.CANCELLED):
            why = f" ({record.reason})" if record.reason else ""
            raise Conflict(f"{label} {record.state.value}{why}; only a succeeded eval task has scores: submit it again")
        raise Conflict(
            f"{label} is {record.state.value}; it has scores once it succeeds: follow it to its end with "
            f"`mloc logs -f {record.task_id[:8]}`"
        )
    if not isinstance(result, dict) or not isinstance(result.get("scores"), dict):
        raise NotFound(f"{label} has no scores left (its result is past retention); run the eval again")
    return result


def table(scores: list[dict[str, Any]]) -> list[Row]:
    """One row per task and metric any run has, in the order the runs first give them."""
    keys_seen: dict[tuple[str, str], None] = {}
    for run in scores:
        for task, metrics in run.items():
            if isinstance(metrics, dict):
                for metric in metrics:
                    if not metric.endswith(STDERR):
                        keys_seen[(task, metric)] = None
    rows = []
    for task, metric in keys_seen:
        cells = [cell(run.get(task), metric) for run in scores]
        row = Row(task=task, metric=metric, cells=cells)
        if len(cells) == 2:
            first, second = cells
            if first.value is not None and second.value is not None:
                row.difference = second.value - first.value
                if first.stderr is not None and second.stderr is not None:
                    row.combined_stderr = math.hypot(first.stderr, second.stderr)
                    # A standard error of 0 (every sample scored alike, as on a handful of samples) measures
                    # no spread: any difference would pass the test, so it is not made.
                    if row.combined_stderr > 0:
                        row.significant = abs(row.difference) > 2 * row.combined_stderr
        rows.append(row)
    return rows


def cell(metrics: Any, metric: str) -> Cell:
    if not isinstance(metrics, dict):
        return Cell()
    return Cell(value=_float(metrics.get(metric)), stderr=_float(metrics.get(metric + STDERR)))


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
