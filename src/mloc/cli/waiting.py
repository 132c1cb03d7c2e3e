"""`--wait`: follow a task to its end saying what it is doing, then print a bounded summary of its result."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from rich.status import Status
from rich.text import Text

from mloc.cli import output, results
from mloc.client import TERMINAL, Client
from mloc.errors import MlocError

# A pipe gets a line when the state, reason or stage changes, and a progress line at most this often.
PROGRESS_EVERY_SEC = 5.0
QUIET_START_SEC = 5.0
STATE_STYLE = {"succeeded": "green", "failed": "red", "cancelling": "yellow", "cancelled": "yellow"}


class Unschedulable(MlocError):
    """The task waits for a worker that no registered worker can be; waiting longer will not help."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(
            f"task {task_id} cannot start: {reason}. It stays queued and starts if a worker that fits "
            f"registers; `mloc cancel {task_id}` drops it"
        )
        self.task_id = task_id
        self.reason = reason


def progress_text(progress: dict[str, Any] | None) -> str:
    """'256/2000 (12.8%), ETA 3 min 12 s' / 'loading model …' from a record's progress, or ''."""
    if not progress:
        return ""
    step, total = progress.get("step"), progress.get("total")
    message = progress.get("message")
    unit = progress.get("unit")
    parts = []
    if total and not (unit and message):  # a dataset task's message counts its rows already
        count = f"{output.amount(step or 0)}/{output.amount(total)}"
        if progress.get("percent") is not None:
            count += f" ({progress['percent']:.1f}%)"
        parts.append(count)
        if progress.get("eta_sec") is not None:
            # Told when the progress was reported: counted down since, to a floor of a second.
            since = time.time() - float(progress.get("updated_at") or time.time())
            parts.append(f"ETA {output.duration(max(1.0, float(progress['eta_sec']) - max(0.0, since)))}")
    elif step and not (unit and message):
        parts.append(f"{output.amount(step, grouped=True)} {unit}" if unit else f"step {output.amount(step)}")
    text = ", ".join(parts)
    if message:
        text = f"{text}: {message}" if text else str(message)
    return text


def quiet_start(record: dict[str, Any]) -> bool:
    """Whether the task has run a while without any progress: executors load their model first."""
    started = record.get("started_at")
    return bool(
        record["state"] == "running"
        and started
        and not record.get("progress")
        and time.time() - started > QUIET_START_SEC
    )


def status_text(record: dict[str, Any]) -> str:
    """One line saying what the task is doing now."""
    state = record["state"]
    if state == "pending":
        reason = record.get("pending_reason")
        return f"pending: {reason}" if reason else "pending"
    worker = record.get("worker_id")
    where = f" on {worker}" if worker else ""
    if state == "assigned":
        return f"assigned to {worker}, starting" if worker else "assigned"
    text = f"{state}{where}"
    if state == "cancelling":
        text += " (stopping its executor)"
    attempts = record.get("attempts") or 0
    if attempts > 1:
        text += f", run {attempts}"
    detail = progress_text(record.get("progress"))
    if not detail and quiet_start(record):
        detail = "no progress reported yet (loading the model?)"
    return f"{text}: {detail}" if detail else text


class Watcher:
    """Shows each record read while waiting: a live line on a terminal, new lines in a pipe."""

    def __init__(self, task_id: str, unschedulable_after: float, *, stderr: bool = False) -> None:
        self.task_id = task_id
        self.unschedulable_after = unschedulable_after
        # On stderr when stdout carries JSON for a script: the progress is for the person watching.
        self.stderr = stderr
        self.terminal = output.err().is_terminal if stderr else output.is_terminal()
        self.status: Status | None = None
        self._last_key: tuple[Any, ...] | None = None
        self._last_progress_at = 0.0
        self._unschedulable_since: float | None = None
        self._last_text = ""

    def live(self) -> AbstractContextManager[Any]:
        if not self.terminal:
            return nullcontext()
        self.status = (output.err() if self.stderr else output.out()).status(Text("submitted"))
        return self.status

    def __call__(self, record: dict[str, Any]) -> None:
        text = output.visible(status_text(record), one_line=True)
        if self.status is not None:
            self.status.update(Text(text))
        else:
            progress = record.get("progress") or {}
            key = (
                record["state"],
                record.get("pending_reason"),
                record.get("worker_id"),
                progress.get("message"),
                quiet_start(record),
            )
            now = time.monotonic()
            step_due = progress.get("step") and now - self._last_progress_at >= PROGRESS_EVERY_SEC
            # A line that says nothing new is not printed again: in a log, a repeat reads as a stall.
            if key != self._last_key or (step_due and record["state"] == "running" and text != self._last_text):
                self._last_key = key
                if progress.get("step"):
                    self._last_progress_at = now
                if record["state"] not in TERMINAL:
                    output.line(text, stderr=self.stderr)
                    self._last_text = text
        self._check_schedulable(record)

    def _check_schedulable(self, record: dict[str, Any]) -> None:
        if record["state"] != "pending" or not record.get("unschedulable"):
            self._unschedulable_since = None
            return
        now = time.monotonic()
        if self._unschedulable_since is None:
            self._unschedulable_since = now
        if now - self._unschedulable_since >= self.unschedulable_after:
            raise Unschedulable(self.task_id, record.get("pending_reason") or "no worker can run it")


def wait(
    client: Client, task_id: str, *, timeout: float, unschedulable_after: float, stderr: bool = False
) -> dict[str, Any]:
    """Follow the task until it ends (raises Unschedulable, MlocError on timeout, KeyboardInterrupt),
    showing its progress on stdout, or on stderr where stdout is for JSON."""
    watcher = Watcher(task_id, unschedulable_after, stderr=stderr)
    with watcher.live():
        return client.wait(task_id, timeout=timeout, on_update=watcher)


def interrupted(task_id: str, state: str | None) -> None:
    """What Ctrl-C during --wait leaves: the task goes on, and how to follow it."""
    now = f" (it is {state})" if state else ""
    output.line(
        f"stopped waiting; task {task_id} goes on{now}. Follow it: mloc logs -f {task_id}; "
        f"its state: mloc show {task_id}; stop it: mloc cancel {task_id}",
        stderr=True,
    )


# -------------------------------------------------------------------- results
def report(client: Client, record: dict[str, Any], *, shown: int, results_dir: str | None = None) -> None:
    """The final state, then at most ``shown`` results and where the rest are."""
    task_id = record["task_id"]
    state = record["state"]
    headline = Text(f"task {task_id} ")
    headline.append(state, style=STATE_STYLE.get(state, ""))
    if record.get("reason"):
        headline.append(": " + output.visible(record["reason"]))
    output.show(headline)
    if state != "succeeded":
        output.line(f"logs: mloc logs {task_id}")
        return
    result = client.result(task_id)
    # `mloc run` passes its results folder: its cluster, and so `mloc result`, is gone once it returns.
    folder = f"{results_dir}/{task_id}" if results_dir else None
    if results.has_lines(result):
        # A dataset task's responses.json holds only totals: its results are the lines beside it.
        lines = list(client.result_lines(task_id, limit=shown)) if shown else []
        rest = f"{folder}/{result['results_file']}" if folder else f"mloc results {task_id}"
        results.print_lines(result, lines, shown, rest)
    else:
        results.print_result(record, result, shown)
    usage = result.get("usage") if isinstance(result, dict) else None
    if isinstance(usage, dict) and usage:
        said = ", ".join(f"{output.visible(k, one_line=True)}={output.amount(v)}" for k, v in usage.items())
        output.line("usage: " + said)
    where = f"{folder}/responses.json" if folder else f"mloc result {task_id}"
    output.line(f"{'totals' if results.has_lines(result) else 'full result'}: {where}")
