"""``spec.when``: a task that runs only if an eval task's score passes, decided when the eval tasks it
reads have succeeded (a quality gate: "run batch inference with the adapter only if it beats the base").

A condition that does not pass skips the task (cancelled, reason code ``condition_not_met``, the
scores in its reason), and the tasks that wait for it with it (:func:`.pipelines.settle_dependent`); the
pipeline counts them as an outcome, not a failure. One that cannot be read (the eval has no such score)
fails it, naming the scores the eval has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mloc.spec.base import Condition
from mloc.store import TaskStore


@dataclass(frozen=True)
class Verdict:
    run: bool
    skip: bool  # when not run: True for a condition that did not pass, False for one that could not be read
    reason: str


async def decide(store: TaskStore, when: dict[str, Any] | None, names: dict[str, str]) -> Verdict | None:
    """Whether a task with this ``when`` (wire form) runs; None when it has no condition. ``names``
    labels the eval tasks (id -> name) in the reason."""
    if not when:
        return None
    condition = Condition.model_validate(when)

    def label(task_id: str) -> str:
        name = names.get(task_id)
        return f"{name} ({task_id[:8]})" if name else task_id[:8]

    score = await _score(store, condition.from_, condition)
    if isinstance(score, str):
        return Verdict(False, False, f"failed: {label(condition.from_)} {score}")
    failed = []
    if condition.min is not None and score < condition.min:
        failed.append(f"below min {condition.min:g}")
    if condition.max is not None and score > condition.max:
        failed.append(f"above max {condition.max:g}")
    compared = ""
    if condition.beats is not None:
        other = await _score(store, condition.beats, condition)
        if isinstance(other, str):
            return Verdict(False, False, f"failed: {label(condition.beats)} {other}")
        wins = score < other if condition.lower_is_better else score > other
        compared = f" against {other:.4g} of {label(condition.beats)}"
        if not wins:
            failed.append(f"does not beat {label(condition.beats)}'s {other:.4g}")
    shown = f"{label(condition.from_)}'s {condition.score} is {score:.4g}"
    if failed:
        return Verdict(False, True, f"skipped: {shown}, {' and '.join(failed)}")
    within = [f"at least min {condition.min:g}"] if condition.min is not None else []
    within += [f"at most max {condition.max:g}"] if condition.max is not None else []
    return Verdict(True, False, f"condition met: {shown}{''.join(', ' + part for part in within)}{compared}")


async def _score(store: TaskStore, task_id: str, condition: Condition) -> float | str:
    """The score ``condition`` reads from eval task ``task_id``, or (text) why there is none."""
    result = await store.result(task_id) or {}
    scores: dict[str, Any] = result.get("scores") or {}
    values = scores.get(condition.task)
    if not isinstance(values, dict):
        return (
            f"has no scores for {condition.task!r} (it scored {', '.join(sorted(scores)) or 'nothing'}); "
            "fix when.score and submit again"
        )
    value = values.get(condition.metric)
    if not isinstance(value, int | float):
        have = sorted(name for name in values if not name.endswith("_stderr"))
        what = "no value" if condition.metric in values else "no such metric"
        return (
            f"has {what} for {condition.score} (its {condition.task} metrics: {', '.join(have) or 'none'}); "
            "fix when.score and submit again"
        )
    return float(value)
