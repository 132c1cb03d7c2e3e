"""The answers of the task, worker, stats and readiness routes, as the OpenAPI document states them.

Those routes build their answers as dicts and send them as they are: the submit and read paths are
the orchestrator's busiest, and a response model would validate and copy every answer. These models
only describe the answers, through each route's ``responses``; nothing is checked at run time. Each
follows the code that builds its answer: :class:`~mloc.records.TaskRecord` and
:class:`~mloc.records.WorkerRecord` as the API dumps them, the orchestrator's submit, dry-run and
stats answers. tests/test_api_answers.py holds real answers to them, so the two cannot drift apart.

A field every answer carries is required, null or not; a field only some answers carry is declared
with :func:`_sometimes`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from mloc.budgetunits import Metric, Period
from mloc.orchestrator.usage import Grouping
from mloc.records import TaskRecord, WorkerRecord
from mloc.state import TaskState

# The routes dump every field of a record, defaults included, so a field with a default is in every
# answer: required in the document, as in the answer.
_EVERY_FIELD = ConfigDict(json_schema_serialization_defaults_required=True)


def _no_default(schema: dict[str, Any]) -> None:
    # A field that is left out has no default to state; a null one would contradict its type.
    schema.pop("default", None)


def _sometimes(description: str) -> Any:
    """A field only some answers carry: optional in the document."""
    # exclude_if is what takes a field out of `required` under json_schema_serialization_defaults_required;
    # these models never serialize an answer, so the predicate only has to say when it is left out.
    return Field(None, description=description, exclude_if=lambda value: value is None, json_schema_extra=_no_default)


# ----------------------------------------------------------------------------------------- submit
class Placed(BaseModel):
    """One replica or chunk of a submitted task, and the worker it went to."""

    task_id: str
    worker_id: str | None = Field(description="Null while it waits.")


class Submitted(BaseModel):
    """A task stored: the worker it was placed on, or why it waits."""

    model_config = _EVERY_FIELD

    ok: Literal[True]
    task_id: str = Field(description="The task's id, which every /api/v1/tasks/{task_id} route takes.")
    worker_id: str | None = Field(
        description="The worker it was placed on (a replica group's or dataset task's first part's); null while it "
        "waits."
    )
    topic: str
    state: TaskState = Field(description="`assigned` when placed at once, else `pending`.")
    pending_reason: str | None = _sometimes("Why it waits; always given for a task of a pipeline (null once placed).")
    unschedulable: bool = _sometimes("With pending_reason: true when no registered worker could ever run it.")
    memory_warning: str = _sometimes("Admission's warning: the memory estimate is close to what the GPUs hold.")
    name: str = _sometimes("A task of a pipeline: its name.")
    depends_on: list[str] = _sometimes("A task of a pipeline: the ids of the tasks it waits for.")
    pipeline_id: str = _sometimes("A task of a pipeline: the pipeline's id.")
    replicas: list[Placed] = _sometimes("A replica group: each replica, in order.")
    chunks: list[Placed] = _sometimes("A dataset task: the chunks cut at submit, in order.")


class DryRun(BaseModel):
    """A task checked and not stored (``dry_run=true``): where it would run now, or why it would wait."""

    ok: Literal[True]
    valid: Literal[True]
    task: dict[str, Any] = Field(description="The task as it would be stored (the mloc/v1 document).")
    topic: str
    would_place_on: list[str] = Field(description="Up to 10 workers it fits on now.")
    memory_estimate: dict[str, Any] | None = Field(description="Admission's estimate of the memory it needs.")
    pending_reason: str = _sometimes("Why it would wait, when no worker fits it now.")
    unschedulable: bool = _sometimes("With pending_reason: true when no registered worker could ever run it.")


class BulkSubmitted(BaseModel):
    """The tasks of a bulk submit, stored, each answered as a single submit is, in the order given."""

    ok: Literal[True]
    count: int
    tasks: list[Submitted]


class BulkDryRun(BaseModel):
    """The tasks of a bulk submit, checked and not stored (``dry_run=true``), in the order given."""

    ok: Literal[True]
    valid: Literal[True]
    count: int
    tasks: list[DryRun]


# ------------------------------------------------------------------------------------------ tasks
class QueueEstimate(BaseModel):
    """A waiting task's place in the queue and about when it starts."""

    position: int | None = Field(
        description="1-based place in the pending order; null while a retry waits out its backoff."
    )
    ahead: int = Field(description="Placeable tasks before it that the same workers could run.")
    eta_sec: float | None = Field(description="Seconds from now until it starts; null when no worker could run it.")
    basis: str = Field(description="What the estimate rests on, for a person.")


class TaskDetail(TaskRecord):
    """A task's record, its document (``spec``) included."""

    model_config = _EVERY_FIELD

    ok: Literal[True]
    queue: QueueEstimate | None = Field(description="A task waiting in the queue: its place and start estimate.")


class TaskRow(TaskRecord):
    """A task as a listing shows it: its record without its document."""

    model_config = _EVERY_FIELD

    spec: SkipJsonSchema[dict[str, Any] | None] = None  # left out of a listing: GET the task for it
    queue_position: int | None = _sometimes(
        "Pending tasks only: the 1-based place in the queue; null for one out of it (waiting for other tasks, "
        "or out its retry backoff)."
    )


class _Page(BaseModel):
    """A page of a listing: which one, and how long a page is."""

    ok: Literal[True]
    page: int
    page_size: int


class TaskPage(_Page):
    """A page of tasks, newest first."""

    total: int = Field(description="The tasks on every page together.")
    items: list[TaskRow]
    next_after: str | None = Field(
        description="The cursor of this page's last task when more follow: `after=` it lists the next page."
    )


class TaskResult(BaseModel):
    """What the task's executor returned (its responses.json); the fields depend on the task type."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------- workers
class WorkerItem(WorkerRecord):
    """A worker as the caller may see it."""

    model_config = _EVERY_FIELD

    lost_after_sec: float = Field(
        description="How long a silence makes it lost (HEARTBEAT_TTL_SEC), for reading last_heartbeat's age."
    )
    hidden_tasks: int = Field(description="The tasks it holds that are not the caller's (their ids are left out).")
    warning: str = _sometimes("Why its results may not reach this orchestrator: it publishes to another store.")


class WorkerPage(_Page):
    """A page of registered workers, by id."""

    total: int = Field(description="The workers on every page together.")
    items: list[WorkerItem]


# ------------------------------------------------------------------------------------------ stats
class UsageDay(BaseModel):
    """A day with usage, and its counters."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float] = Field(init=False)

    date: dt.date


class UsagePeriod(BaseModel):
    """An ISO week (``2026-W48``) or a month (``2026-11``) with usage, and its counters."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float] = Field(init=False)

    period: str


class BudgetStanding(BaseModel):
    """A budget and what was spent against it in its current day or month."""

    metric: Metric
    gpu_model: str | None = Field(description="GPU time on this GPU model only; null for any.")
    period: Period
    limit: float
    spent: float
    hard: bool = Field(description="Running tasks are stopped once it is exhausted.")
    exhausted: bool
    resets: dt.date = Field(description="The UTC day its period turns.")
    text: str


class UserUsage(BaseModel):
    """One user's usage over the range: totals, and the rows the grouping asked for."""

    model_config = _EVERY_FIELD

    user: str
    totals: dict[str, float] = Field(description="Each counter over the range (tasks, tasks.TYPE.STATE, wall_sec...).")
    days: list[UsageDay] = _sometimes("group_by=day: each day with usage, oldest first.")
    periods: list[UsagePeriod] = _sometimes("group_by=week or month: each period with usage, oldest first.")
    budgets: list[BudgetStanding] = _sometimes("The user's budgets, when they have any.")


class Stats(BaseModel):
    """Usage per user over a range of UTC days."""

    ok: Literal[True]
    start_date: dt.date
    end_date: dt.date
    group_by: Grouping
    users: list[UserUsage]
    truncated: bool = Field(description="Users were left out: the next page starts after next_after.")
    next_after: str | None


# ----------------------------------------------------------------------------------------- health
class Ready(BaseModel):
    """/readyz's answer while Redis answers."""

    ok: Literal[True]
    status: Literal["ready"]


class NotReady(BaseModel):
    """/readyz's answer while Redis does not answer."""

    ok: Literal[False]
    status: str
    error: str


def link_task_routes(schema: dict[str, Any], submit_path: str) -> dict[str, Any]:
    """Link the ``task_id`` of a submit's answer to each operation on that task, so a generated client
    or a stateful test can follow a submit to its task."""
    root = submit_path + "/{task_id}"
    links: dict[str, Any] = {}
    for path, item in schema["paths"].items():
        rest = path.removeprefix(root)
        # Only the operations the task's id alone names: a link cannot fill in another path parameter.
        if rest == path or (rest and not rest.startswith("/")) or "{" in rest:
            continue
        for operation in item.values():
            name = operation.get("summary", "").replace(" ", "") or operation["operationId"]
            links[name] = {
                "operationId": operation["operationId"],
                "parameters": {"task_id": "$response.body#/task_id"},
            }
    schema["paths"][submit_path]["post"]["responses"]["201"]["links"] = links
    return schema
