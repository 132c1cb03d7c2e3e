"""An eval task's harness tasks against the data the fleet holds, at submit.

The orchestrator cannot see a worker's dataset cache; each worker advertises the harness tasks it holds
the data of (``capabilities.eval.harness_tasks``, see :mod:`mloc.executors.eval_data`), and placement
needs them like an engine. When workers that run eval tasks are registered and none holds the data of
every harness task a task names, the task is refused at once, naming the tasks and how to cache them:
it could only wait. With no such worker registered, it waits with that reason instead.
"""

from __future__ import annotations

from mloc.errors import SpecError
from mloc.records import WorkerStatus, WorkerView
from mloc.spec import Document
from mloc.spec.eval import EvalSpec, harness_data_fix

SHOWN = 5


def held(view: WorkerView) -> set[str]:
    return set(view.capabilities.get("eval", {}).get("harness_tasks") or [])


def check(document: Document, views: list[WorkerView]) -> None:
    """Raise :class:`SpecError` when registered eval workers exist and none holds the data of all the
    harness tasks ``document`` names; nothing is stored."""
    spec = document.spec
    if not isinstance(spec, EvalSpec) or not spec.eval.tasks:
        return
    evaluators = [v for v in views if v.status == WorkerStatus.ACTIVE and "eval" in v.task_types]
    if not evaluators:
        return
    wanted = spec.eval.tasks
    if any(held(view).issuperset(wanted) for view in evaluators):
        return
    nowhere = [name for name in wanted if not any(name in held(view) for view in evaluators)]
    workers = ", ".join(
        f"{view.worker_id}: {', '.join(sorted(held(view))[:SHOWN]) or 'none'}"
        + (f" and {len(held(view)) - SHOWN} more" if len(held(view)) > SHOWN else "")
        for view in evaluators[:SHOWN]
    )
    if nowhere:
        what = f"no worker holds the data of harness task(s) {', '.join(map(repr, nowhere))}"
        fix = f"cache it: {harness_data_fix(nowhere[0])}"
        index = wanted.index(nowhere[0])
    else:
        what = f"no one worker holds the data of all of {', '.join(map(repr, wanted))}"
        fix = "cache them all on one worker, or split the harness tasks over several eval tasks"
        index = 0
    message = f"{what} (workers that run eval tasks, with the harness data they hold: {workers})"
    raise SpecError(
        f"spec.eval.tasks: no registered worker can run this task: {message}; to fix: {fix}; nothing was stored",
        details=[{"path": f"spec.eval.tasks[{index}]", "message": message, "fix": fix}],
    )
