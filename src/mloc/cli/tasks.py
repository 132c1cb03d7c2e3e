"""Task commands: submit, tasks, show, result, cancel, resume, pipeline, logs, metrics."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from mloc.cli import output, results, waiting
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import TaskIdArg, app, client, task_failed
from mloc.client import ApiError, Client, Lost, Unreachable
from mloc.errors import MlocError
from mloc.spec.base import OFFSET_LABEL
from mloc.spec.dataset import CHUNK_LABEL
from mloc.state import Reason, TaskState

SHORT_ID = 8
ALL_IDS_PAGE = 500  # the API's largest page
DEFAULT_PAGE_SIZE = 20


# --------------------------------------------------------------------- submit
STDIN = Path("-")
STDIN_LABEL = "stdin"


def _read(files: list[Path]) -> list[tuple[str, bytes]]:
    """Each file's name and bytes; ``-`` is standard input, named 'stdin'."""
    if files.count(STDIN) > 1:
        output.die("give - (standard input) once: it is read to its end the first time")
    read: list[tuple[str, bytes]] = []
    for file in files:
        try:
            read.append((STDIN_LABEL, sys.stdin.buffer.read()) if file == STDIN else (str(file), file.read_bytes()))
        except OSError as exc:
            output.die(f"cannot read {file}: {exc.strerror or exc}")
    return read


def _documents(read: list[tuple[str, bytes]]) -> list[tuple[str, Any]]:
    """Every task in the files, labelled 'file' or 'file (document N)', with its name where it has one
    ('file (document N: name)'); multi-document files split."""
    from mloc.spec.loader import parse_stream

    found: list[tuple[str, Any]] = []
    for name, raw in read:
        try:
            documents = [d for d in parse_stream(raw, limit=len(raw) + 1) if d is not None]
        except MlocError as exc:
            output.die(f"{name}: {exc.message}")
        if len(documents) == 1:
            found.append((name, documents[0]))
        else:
            found.extend((f"{name} (document {n}{_named(d)})", d) for n, d in enumerate(documents, start=1))
    return found


def _named(document: Any) -> str:
    """': name' for a document whose metadata names it (a pipeline's step), else ''."""
    metadata = document.get("metadata") if isinstance(document, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f": {name}" if isinstance(name, str) and name else ""


def _submit_many(api: Client, labelled: list[tuple[str, Any]], key: str | None) -> list[dict[str, Any]]:
    try:
        return list(api.submit_bulk([document for _, document in labelled], idempotency_key=key)["tasks"])
    except MlocError as exc:
        # The bulk answer numbers the invalid tasks; name their files instead.
        for detail in exc.details:
            index = detail.get("index") if isinstance(detail, dict) else None
            if isinstance(index, int) and 0 <= index < len(labelled):
                detail["index"] = labelled[index][0]
                inner = detail.get("details") or []
                if inner and isinstance(inner[0], dict) and inner[0].get("path"):
                    first = inner[0]
                    detail["message"] = (
                        f"{first['path']}: {output.with_fix(str(first.get('message')), first.get('fix'))}"
                    )
        output.fail(exc)


def _prompts_held(record: dict[str, Any]) -> str:
    """', prompts 4-6': which of its group's prompts a replica holds ('' when its record does not say)."""
    offset = (record.get("labels") or {}).get(OFFSET_LABEL)
    inference = ((record.get("spec") or {}).get("spec") or {}).get("inference") or {}
    count = len(inference.get("prompts") or []) + len(inference.get("messages") or [])
    if offset is None or not offset.isdigit() or not count:
        return ""
    return f", prompts {int(offset) + 1:,}-{int(offset) + count:,}"


def _said(answer: dict[str, Any], label: str) -> None:
    task_id = answer["task_id"]
    parts = answer.get("chunks") or answer.get("replicas")
    if parts:
        # The task itself runs nowhere: its parts were placed, each on its own worker.
        workers = list(dict.fromkeys(p["worker_id"] for p in parts if p.get("worker_id")))
        placed = sum(1 for p in parts if p.get("worker_id"))
        what = f"its first {len(parts)} chunk(s)" if answer.get("chunks") else f"its {len(parts)} replicas"
        if placed == len(parts):
            where = f"{what} assigned to {', '.join(workers)}"
        elif placed:
            where = f"{what}: {placed} assigned to {', '.join(workers)}, {len(parts) - placed} pending"
        else:
            where = f"{what} pending"
    elif answer.get("worker_id"):
        where = f"assigned to {answer['worker_id']}"
    elif answer.get("pending_reason"):
        where = f"pending: {answer['pending_reason']}"
    else:
        where = answer.get("state", "pending")
    output.line(output.visible(f"submitted {task_id} ({label}), {where}", one_line=True))


def _dry_run_lines(label: str, answer: dict[str, Any]) -> list[str]:
    """What `mloc submit --dry-run` says of one task: valid, where it would go, what memory it needs."""
    task = answer.get("task") or {}
    spec = task.get("spec") or {}
    lines = [f"valid: {label}: {task.get('kind', 'Task')} ({spec.get('taskType', '?')}), topic {answer.get('topic')}"]
    placed = answer.get("would_place_on") or []
    if placed:
        lines.append(f"  would be placed on: {', '.join(placed)}")
    elif answer.get("pending_reason"):
        how = "could never start" if answer.get("unschedulable") else "would wait"
        lines.append(f"  {how}: {answer['pending_reason']}")
    lines.extend(f"  {name}: {text}" for name, text in _estimate_rows(answer.get("memory_estimate") or {}))
    return lines


@app.command()
def submit(
    files: Annotated[
        list[Path],
        # Not exists=True: Typer then refuses "-" (its dash check compares the Path it made with the
        # string "-"); _read says which file cannot be read instead.
        typer.Argument(dir_okay=False, help="Task files (YAML or JSON); - reads them from standard input."),
    ],
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the task (each of several, in turn) and print its result.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate and show placement only (--json: the whole answer); exits 1 if a task could never start.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="--wait: seconds to wait for the end.")] = 3600,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout",
            help="--wait: seconds to keep waiting while no registered worker can ever run the task.",
        ),
    ] = 30,
    shown: Annotated[
        int, typer.Option("--show", min=0, help="--wait: results (an agent's tool calls) printed at the end.")
    ] = 10,
    json_out: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the new task ids.")] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Store the submit once however often it is sent with this key (per user, for a day): "
            "a script that runs again after a failure gets the first answer, not new tasks. "
            "Without it, each run makes its own key, which mloc's own retries reuse.",
        ),
    ] = None,
) -> None:
    """Submit task files to the orchestrator (MLOC_API_URL); - reads the tasks from standard input
    (`make-tasks | mloc submit -`).

    Several files, or a file with several YAML documents (---), go in one request: all are stored, or
    none when any is invalid.

    --json prints one object of the same shape however many tasks there are: "tasks" lists each task's
    answer in the order given (with --wait, its ended record and its "result", null unless it succeeded;
    with --dry-run, its check), "count" says how many, and "ok" is true (with --wait: true when every
    task succeeded, as the exit status says). With one task, its answer's fields are also at the top,
    as they were before the list: `jq -r .task_id` still works, and `jq -r '.tasks[].task_id'` works
    for any number. A result (--wait) is only in "tasks" (`jq .tasks[0].result`), never at the top,
    so a large one is printed once and is read the same way for one task or many."""
    api = client()
    read = _read(files)
    labelled = _documents(read)
    if not labelled:
        output.die(f"no task in {', '.join(name for name, _ in read)}: the files hold no YAML document")
    # One task goes as the file's own bytes, so the API's messages point into the file as written.
    single = len(read) == 1 and len(labelled) == 1
    try:
        if dry_run:
            checked = (
                api.submit(read[0][1], dry_run=True)
                if single
                else api.submit_bulk([document for _, document in labelled], dry_run=True)
            )
            answers = checked.get("tasks", [checked])
            if json_out:
                output.print_json(_json_answer(answers, valid=True))
            else:
                for (label, _), answer in zip(labelled, answers, strict=True):
                    for line in _dry_run_lines(label, answer):
                        output.line(output.visible(line, one_line=True))
            # As `--wait` ends for such a task: a script learns it from the exit code.
            if any(answer.get("unschedulable") for answer in answers):
                raise typer.Exit(1)
            return
        answers = (
            [api.submit(read[0][1], idempotency_key=idempotency_key)]
            if single
            else _submit_many(api, labelled, idempotency_key)
        )
    except MlocError as exc:
        output.fail(exc)
    try:
        if json_out and wait:
            pass  # one JSON document, of the ended tasks, once they have ended
        elif json_out:
            output.print_json(_json_answer(answers))
        elif quiet:
            for answer in answers:
                output.line(answer["task_id"])
        else:
            for (label, _), answer in zip(labelled, answers, strict=True):
                _said(answer, label)
            pipeline_id = answers[0].get("pipeline_id") if answers else None
            if pipeline_id:
                output.line(f"pipeline {pipeline_id}: `mloc pipeline {pipeline_id}` shows its steps")
        if wait:
            ids = [answer["task_id"] for answer in answers]
            _wait(api, ids, timeout=timeout, wait_timeout=wait_timeout, shown=shown, json_out=json_out)
    except KeyboardInterrupt:
        # From here on the tasks are stored: say that they go on, whenever Ctrl-C comes.
        for answer in answers if wait else []:
            _interrupted(api, answer["task_id"])
        raise typer.Exit(130) from None


def _json_answer(answers: list[dict[str, Any]], *, ok: bool = True, **more: Any) -> dict[str, Any]:
    """What `mloc submit --json` prints, one shape for any number of tasks: ok, count and the tasks'
    answers; one task's answer also spread at the top, which is all a single submit printed before.

    The top copy leaves out the task's result (--wait): it can be as large as the task's whole
    output, and a script finds it in ``tasks`` whatever the number of tasks."""
    alone = {key: value for key, value in answers[0].items() if key != "result"} if len(answers) == 1 else {}
    body = {"ok": ok, **alone, **more, "count": len(answers), "tasks": answers}
    body["ok"] = ok  # the whole's, not the one task's
    return body


def _interrupted(api: Client, task_id: str) -> None:
    try:
        state = api.task(task_id)["state"]
    except (MlocError, KeyboardInterrupt):
        state = None
    waiting.interrupted(task_id, state)


def _wait(
    api: Client,
    task_ids: list[str],
    *,
    timeout: float,
    wait_timeout: float,
    shown: int,
    json_out: bool = False,
) -> None:
    """Follow the tasks one after another, in the order submitted (a pipeline's steps end in that
    order or are ended by a step before them), each reported as it ends; ``timeout`` is for them all.
    Exits 1 once all have ended when any did not succeed; a step its gate skipped (``spec.when``, or
    waiting for such a step) took the branch not chosen, which is not a failure. With ``json_out``,
    stdout gets one JSON document once all have ended (:func:`_json_answer`): each ended task's record
    with its ``result`` (null unless it succeeded); the rest goes to stderr."""
    deadline = time.monotonic() + timeout
    unsucceeded = skipped = 0
    ended: list[dict[str, Any]] = []
    task_id = task_ids[0]
    try:
        for number, task_id in enumerate(task_ids, 1):
            if len(task_ids) > 1:
                said = output.styled(f"[{number}/{len(task_ids)}] waiting for {task_id}", "bold")
                output.line(said, stderr=json_out)
            left = max(1.0, deadline - time.monotonic())
            record = waiting.wait(api, task_id, timeout=left, unschedulable_after=wait_timeout, stderr=json_out)
            if json_out:
                ended.append({**record, "result": api.result(task_id) if record["state"] == "succeeded" else None})
            else:
                waiting.report(api, record, shown=shown)
            if _skipped(record):
                skipped += 1
            else:
                unsucceeded += record["state"] != "succeeded"
    except KeyboardInterrupt:
        for left_id in task_ids[task_ids.index(task_id) :]:
            _interrupted(api, left_id)
        raise typer.Exit(130) from None
    except waiting.Unschedulable as exc:
        output.fail(exc, code=1)
    except Unreachable:
        _lost(api, task_id)
    except MlocError as exc:
        output.fail(exc)
    if json_out:
        output.print_json(_json_answer(ended, ok=not unsucceeded))
    gated = f"; {skipped} skipped by a gate (spec.when) that did not pass" if skipped else ""
    if unsucceeded:
        if len(task_ids) > 1:
            output.line(f"{unsucceeded} of {len(task_ids)} tasks did not succeed{gated}", stderr=True)
        raise typer.Exit(1)
    if skipped:
        output.line(f"{len(task_ids) - skipped} of {len(task_ids)} tasks succeeded{gated}", stderr=json_out)


def _skipped(record: dict[str, Any]) -> bool:
    return record.get("state") == "cancelled" and record.get("reason_code") == Reason.CONDITION_NOT_MET


# ---------------------------------------------------------------------- lists
def short_ids(ids: list[str]) -> dict[str, str]:
    """The first 8 characters of each id, longer where two ids on the page share them."""
    shown: dict[str, str] = {}
    for task_id in ids:
        length = SHORT_ID
        while any(other != task_id and other.startswith(task_id[:length]) for other in ids) and length < len(task_id):
            length += 1
        shown[task_id] = task_id[:length]
    return shown


@app.command("tasks")
def list_tasks(
    state: Annotated[TaskState | None, typer.Option(help="Only tasks in this state.", show_default=False)] = None,
    owner: Annotated[str | None, typer.Option(help="Only this user's tasks (admin).")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only this task type.")] = None,
    children: Annotated[
        bool,
        typer.Option(
            "--children",
            help="Also the chunks of dataset tasks and the shards of replica groups (mloc show lists them).",
        ),
    ] = False,
    page: Annotated[int | None, typer.Option(min=1, help="This page only (default: the first; with -q: all).")] = None,
    page_size: Annotated[int, typer.Option(min=1, max=500)] = DEFAULT_PAGE_SIZE,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="Full ids and reasons.")] = False,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
    quiet: Annotated[
        bool,
        typer.Option("-q", "--quiet", help="Print only the ids, one a line: every matching task's, unless --page."),
    ] = False,
) -> None:
    """List tasks, newest first. The id column shows short ids that every command accepts.

    -q prints the id of every task that matches (for `mloc tasks -q --state pending | xargs -r mloc cancel`)."""
    api = client()
    filters = {
        "state": state.value if state else None,
        "owner": owner,
        "task_type": task_type,
        "children": "true" if children else None,
    }
    if quiet and page is None and not wants_json(json_out, fmt):
        _all_ids(api, filters)
        return
    try:
        body = api.tasks(**filters, page=page or 1, page_size=page_size)
    except MlocError as exc:
        output.fail(exc)
    if wants_json(json_out, fmt):
        output.print_json(body)
        return
    items = body["items"]
    if not items and body["total"]:
        pages = -(-body["total"] // body["page_size"])
        output.line(
            output.styled(f"page {body['page']} is past the last: {body['total']} task(s) fill {pages} page(s)", "dim"),
            stderr=True,
        )
    if quiet:
        for item in items:
            output.line(item["task_id"])
        _more(body, filters, quiet=True)
        return
    shown = len(items)
    pages = f"page {body['page']}, {shown} of {body['total']}" if body["total"] > shown else f"{shown}"
    output.show(task_table(items, title=f"tasks ({pages})", wide=wide))
    _more(body, filters, quiet=False)


def task_table(items: list[dict[str, Any]], *, title: str, wide: bool = False) -> Table:
    """The table `mloc tasks` prints: its ids whole at any terminal width, as `mloc show` takes them."""
    ids = {item["task_id"]: item["task_id"] for item in items} if wide else short_ids([i["task_id"] for i in items])
    grid = output.table("ID", "NAME", "TYPE", "OWNER", "STATE", "WORKER", "CREATED", "REASON", title=title)
    output.keep_whole(grid, 0, ids.values())
    for t in items:
        reason = t.get("reason") or t.get("pending_reason") or ""
        if t.get("queue_position"):
            reason = f"#{t['queue_position']} in queue: {reason}"
        grid.add_row(
            ids[t["task_id"]],
            output.cell(t["name"]),
            output.cell(t["task_type"]),
            output.cell(t["owner"]),
            _state_cell(t),
            output.cell(_where(t)),
            output.ago(t["created_at"]),
            output.cell(reason, None if wide else 60),
        )
    return grid


def _where(task: dict[str, Any]) -> str:
    """The WORKER cell: a dataset task or a replica group runs nowhere itself, but over its parts."""
    parts = task.get("children") or []
    if task.get("worker_id") or not parts:
        return str(task.get("worker_id") or "-")
    if not task.get("chunk_rows"):
        return f"{len(parts)} replicas"
    # Once it succeeded, the chunks that held rows, as its result counts them: one cut past the data's end is not.
    held = (task.get("result_summary") or {}).get("chunks")
    return f"{held if isinstance(held, int) else len(parts)} chunk(s)"


def _more(body: dict[str, Any], filters: dict[str, str | None], *, quiet: bool) -> None:
    """On stderr, past a page that is not the last: how many more tasks match and the command for them."""
    after = (body["page"] - 1) * body["page_size"] + len(body["items"])
    if body["total"] <= after or not body["items"]:
        return
    given = [
        f"--{k}" if k == "children" else f"--{'type' if k == 'task_type' else k} {v}"
        for k, v in filters.items()
        if v is not None
    ]
    if body["page_size"] != DEFAULT_PAGE_SIZE:
        given.append(f"--page-size {body['page_size']}")
    more = " ".join(["mloc tasks", *given, *(["-q"] if quiet else []), f"--page {body['page'] + 1}"])
    also = "; -q without --page prints every id" if quiet else ""
    output.line(
        output.styled(output.visible(f"{body['total'] - after} more: {more}{also}", one_line=True), "dim"), stderr=True
    )


def _all_ids(api: Client, filters: dict[str, str | None]) -> None:
    """Every matching task's id, a page of the largest size at a time (by cursor: each once, whatever is
    submitted or ends meanwhile), printed once all are read, so a script that acts on them (cancels
    them) starts with the whole list."""
    try:
        ids = [item["task_id"] for item in api.each_task(**filters, page_size=ALL_IDS_PAGE)]
    except MlocError as exc:
        output.fail(exc)
    for task_id in ids:
        output.line(task_id)


def _state_cell(record: dict[str, Any]) -> Any:
    state = record["state"]
    text = state
    progress = record.get("progress") or {}
    if state == "running" and progress.get("percent") is not None:
        text += f" {progress['percent']:.0f}%"
    return output.styled(text, waiting.STATE_STYLE.get(state, ""))


# ----------------------------------------------------------------------- show
def _summary(record: dict[str, Any], worker_record: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The rows of `mloc show`; ``worker_record`` is the worker that holds the task, when it holds one."""
    task_id = record["task_id"]
    rows: list[tuple[str, str]] = [
        ("task", task_id),
        ("name", record.get("name") or "-"),
        ("type", f"{record.get('task_type')} ({record.get('kind')}), topic {record.get('topic')}"),
        ("owner", record.get("owner") or "-"),
    ]
    state = record["state"]
    worker = record.get("worker_id")
    text = state + (f" on {worker}" if worker and state in ("assigned", "running", "cancelling") else "")
    if state == "cancelling":
        by = record.get("cancel_requested_by")
        text += f" (cancel requested{f' by {by}' if by else ''}; its executor is stopping)"
    rows.append(("state", text))
    if state == "pending" and record.get("pending_reason"):
        rows.append(("waiting", ("cannot start: " if record.get("unschedulable") else "") + record["pending_reason"]))
    queue = record.get("queue")
    if state == "pending" and queue:
        place = f"position {queue['position']}" if queue.get("position") else "waiting out a retry backoff"
        when = f", starts in about {_duration(queue['eta_sec'])}" if queue.get("eta_sec") is not None else ""
        rows.append(("queue", f"{place}, {queue['ahead']} ahead on its workers{when} ({queue['basis']})"))
    if record.get("reason"):
        code = f" ({record['reason_code']})" if record.get("reason_code") else ""
        rows.append(("reason", record["reason"] + code))
    progress = waiting.progress_text(record.get("progress"))
    if progress:
        rows.append(("progress", progress))
    # A start ended by a worker's loss is a requeue, not one of the task's attempts (mloc.requeue).
    requeues = int(record.get("requeues") or 0)
    runs = int(record.get("attempts") or 0)
    lost = (
        f", and {requeues} requeue(s) after its worker stopped or was lost, which do not count ({runs} runs in all)"
        if requeues
        else ""
    )
    if not record.get("children"):  # a group's parent runs nowhere itself: its chunks or replicas have attempts
        rows.append(("attempts", f"{runs - requeues} of {record.get('max_attempts', 1)}{lost}"))
    if worker:
        rows.append(("worker", worker + _worker_health(worker_record)))
    created = float(record.get("created_at") or 0)
    assigned, started, finished = (record.get(k) for k in ("assigned_at", "started_at", "finished_at"))
    if record.get("cut_at"):
        # A chunk is created with its dataset task's time (its place in the queue); it waits from its cut.
        rows.append(("created", f"{output.at(created)}, with its dataset task"))
        rows.append(("cut", output.at(record["cut_at"])))
        created = float(record["cut_at"])
    else:
        rows.append(("created", output.at(created)))
    resumed = record.get("resumed_at")
    if resumed and not record.get("cut_at"):
        # Its earlier runs, and the time it sat ended, are not this run's wait.
        rows.append(("resumed", output.at(resumed)))
    # Back in the queue after a run (a resume, or a requeue): its wait counts from the latest.
    since = "cut" if record.get("cut_at") else "created"
    for field, how in (("resumed_at", "resumed"), ("requeued_at", "requeued")):
        at = record.get(field)
        if at and float(at) >= created:
            created, since = float(at), how
    if state == "pending":
        # Back in the queue after a requeue, its last attempt's start and run are not this wait's.
        rows.append(("queued", output.duration(time.time() - created) + " so far"))
    elif started or assigned:
        until = "started" if started else "assigned"
        rows.append(("queued", output.duration(float(started or assigned or 0) - created) + f" ({since} to {until})"))
    if started and state != "pending":
        end = finished or time.time()
        stopped = float(record.get("stopped_sec") or 0)
        # A resumed task's time stopped before its resume is not run time.
        paused = f" (and {output.duration(stopped)} stopped before it was resumed)" if stopped else ""
        since_resume = " since its resume" if resumed and not record.get("cut_at") else ""
        rows.append(
            ("ran", output.duration(end - started - stopped) + ("" if finished else " so far") + since_resume + paused)
        )
    if finished:
        rows.append(("finished", output.at(finished)))
    if record.get("pipeline_id"):
        rows.append(("pipeline", f"{record['pipeline_id']} (`mloc pipeline {record['pipeline_id']}` shows its steps)"))
    if record.get("parent_id") and CHUNK_LABEL in (record.get("labels") or {}):
        rows.append(("chunk of", f"{record['parent_id']} (chunk {record.get('replica')})"))
    elif record.get("parent_id"):
        held = _prompts_held(record)
        rows.append(("replica of", f"{record['parent_id']} (replica {record.get('replica')}{held})"))
    if record.get("children") and record.get("chunk_rows"):
        count = len(record["children"])
        joined = (record.get("result_summary") or {}).get("chunks") if state == "succeeded" else None
        # The window may have cut a chunk or two past the data's end before that end was known.
        cut = f"{joined} (and {count - joined} cut past the data's end)" if joined and joined < count else str(count)
        rows.append(
            (
                "chunks",
                f"{cut}{'' if finished else ' cut so far'}, {record['chunk_rows']:,} rows each "
                f"(`mloc logs {task_id} --chunks` prints their lines; --json lists their ids)",
            )
        )
    elif record.get("children"):
        rows.append(("replicas", ", ".join(record["children"])))
    rows.extend(_memory_rows(record))
    usage = record.get("usage") or {}
    if usage:
        rows.append(("usage", ", ".join(f"{k}={output.amount(v)}" for k, v in usage.items())))
    if state == "succeeded":
        rows.append(("result", f"mloc result {task_id} (files: mloc artifacts {task_id})"))
    for name, artifact in (record.get("artifacts") or {}).items():
        path = artifact.get("path") if isinstance(artifact, dict) else artifact
        rows.append(("artifact", f"{name}: {path}"))
    if state in ("running", "cancelling", "failed", "succeeded", "cancelled"):
        rows.append(("logs", f"mloc logs {task_id}"))
    return rows


def _estimate_rows(estimate: dict[str, Any]) -> list[tuple[str, str]]:
    """The memory estimate admission made, as `mloc show` and `mloc submit --dry-run` print it: its
    line, its notes and its warning."""
    rows: list[tuple[str, str]] = []
    if estimate.get("explain"):
        overridden = estimate.get("overridden_by_user")
        by_user = f" (placed by your gpu.memory, {output.size(overridden['gpu_memory_bytes'])})" if overridden else ""
        rows.append(("memory", f"{estimate['explain']}{by_user}"))
        rows.extend(("memory-note", note) for note in estimate.get("notes") or ())
    if estimate.get("warning"):
        rows.append(("memory-warning", estimate["warning"]))
    return rows


def _memory_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The memory estimate admission made (its line, notes and warning) and the peak the run measured."""
    rows = _estimate_rows(record.get("memory_estimate") or {})
    peak = record.get("memory_peak_bytes")
    if peak:
        detail = record.get("memory_peak") or {}
        if detail.get("device") == "gpu":
            rows.append(("memory-peak", f"{output.size(peak)} (on its fullest GPU, measured)"))
        else:
            # An executor process keeps the models of earlier tasks warm: its size at the start was theirs.
            start = int(detail.get("rss_start_bytes") or 0)
            held = (
                f"; {output.size(max(0, int(peak) - start))} above the {output.size(start)} its executor process "
                "held at its start"
                if start
                else ""
            )
            rows.append(("memory-peak", f"{output.size(peak)} (RSS, measured{held})"))
    return rows


def _worker_health(worker: dict[str, Any] | None) -> str:
    """What `mloc show` adds to the worker that holds a task when something is amiss with it: a worker
    that died goes on showing its task running, at its last progress, until it is declared lost."""
    if not worker:
        return ""
    status, age, limit = worker.get("status"), worker.get("heartbeat_age_sec"), worker.get("lost_after_sec")
    if status in ("lost", "offline"):
        return f" ({status}: the task goes back to the queue)"
    if isinstance(age, int | float) and isinstance(limit, int | float) and age > limit / 2:
        return (
            f" (no heartbeat for {_duration(age)}: it may be down; if none comes within {_duration(limit)} "
            "of the last, it is declared lost and the task goes back to the queue)"
        )
    return f" ({status})" if status and status != "active" else ""


@app.command()
def show(
    task_id: TaskIdArg,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
    shown: Annotated[
        int, typer.Option("--show", min=0, help="A finished RAG task's answers, or agent's steps, printed.")
    ] = 10,
) -> None:
    """A task in brief: state, reason, progress and ETA, times, worker, where its result is; a finished
    RAG task's answers, each with the sources it was given; a finished agent's question, tool calls and
    answer.

    --json prints the full record."""
    api = client()
    try:
        record = api.task(task_id)
    except MlocError as exc:
        task_failed(api, task_id, exc)
    if wants_json(json_out, fmt):
        output.print_json({"ok": True, **record})  # as every --json answer starts
        return
    holder = None
    if record.get("worker_id") and record["state"] in ("assigned", "running", "cancelling"):
        with contextlib.suppress(MlocError):  # gone meanwhile: the task's own rows say enough
            holder = api.worker(record["worker_id"])
    rows = _summary(record, holder)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        output.line(output.styled(key.ljust(width), "bold"), output.visible(value, one_line=True))
    answered = record.get("task_type") in ("rag_inference", results.AGENT_TASK_TYPE)
    if record["state"] == "succeeded" and answered and shown:
        try:
            result = api.result(record["task_id"])
        except MlocError as exc:
            output.fail(exc)
        output.line("")
        results.print_result(record, result, shown)


@app.command()
def result(task_id: TaskIdArg, json_out: JsonFlag = False, fmt: OutputFormat = None) -> None:
    """Print a task's full result (responses.json) as JSON."""
    api = client()
    try:
        output.print_json(api.result(task_id))
    except MlocError as exc:
        task_failed(api, task_id, exc)


@app.command()
def cancel(
    task_ids: Annotated[
        list[str],
        typer.Argument(help="Task ids, or unique prefixes (`mloc tasks -q --state pending | xargs -r mloc cancel`)."),
    ],
    json_out: JsonFlag = False,
) -> None:
    """Cancel tasks in any state before they end. With several ids, each is cancelled in turn and
    those that cannot be (ended meanwhile, unknown) are listed; the command then exits 1."""
    api = client()
    if len(task_ids) == 1:
        try:
            answer = api.cancel(task_ids[0])
        except MlocError as exc:
            task_failed(api, task_ids[0], exc)
        if json_out:
            output.print_json(answer)
        else:
            output.line(_cancelled_text(answer))
        return
    answers: list[dict[str, Any]] = []
    for given in task_ids:
        try:
            answers.append(api.cancel(given))
        except MlocError as exc:
            answers.append({"ok": False, "task_id": given, "error": exc.message})
    refused = [answer for answer in answers if not answer.get("ok")]
    if json_out:
        output.print_json({"ok": not refused, "tasks": answers})
    else:
        for answer in answers:
            if answer.get("ok"):
                output.line(_cancelled_text(answer))
            else:
                output.error_line(f"{answer['task_id']}: {answer['error']}")
        output.line(f"{len(answers) - len(refused)} of {len(answers)} cancelled or stopping")
    if refused:
        raise typer.Exit(1)


def _cancelled_text(answer: dict[str, Any]) -> str:
    if answer.get("state") == "cancelling":
        return f"cancelling {answer['task_id']}: it is running and stops at its next check (mloc show)"
    return f"cancelled {answer['task_id']}"


@app.command()
def pipeline(
    pipeline_id: Annotated[str, typer.Argument(help="The pipeline id `mloc submit` printed.")],
    cancel_it: Annotated[bool, typer.Option("--cancel", help="Cancel every step that has not ended.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Show a pipeline's steps (what each waits for, its state), or cancel every step that has not ended."""
    api = client()
    try:
        if cancel_it:
            answer = api.cancel_pipeline(pipeline_id)
            if json_out:
                output.print_json(answer)
            else:
                # The id the orchestrator answered with: the one given may be a prefix or a step's task id.
                full = answer.get("pipeline_id") or pipeline_id
                output.line(f"cancelled {len(answer['cancelled'])} step(s) of pipeline {full}")
            return
        body = api.pipeline(pipeline_id)
    except MlocError as exc:
        output.fail(exc)
    if json_out:
        output.print_json(body)
        return
    names = {node["task_id"]: node["name"] for node in body["tasks"]}
    output.line(f"pipeline {body.get('id') or pipeline_id}: {body['state']}")
    for node in body["tasks"]:
        after = ", ".join(names.get(t, t[:SHORT_ID]) for t in node["depends_on"])
        state = "skipped" if node.get("skipped") else node["state"] or "gone"
        why = node.get("reason") or node.get("pending_reason") or ""
        line = f"  {node['name']:<24} {node['task_id'][:SHORT_ID]}  {state:<10}"
        line += f" after {after}" if after else ""
        line += f"  ({why})" if why and state in ("pending", "failed", "cancelled", "skipped") else ""
        output.line(output.visible(line, one_line=True))


@app.command()
def resume(task_id: TaskIdArg, json_out: JsonFlag = False) -> None:
    """Run a failed or cancelled task again from where it stopped: a dataset task's finished chunks
    stand, a training task continues from its last checkpoint."""
    api = client()
    try:
        answer = api.resume(task_id)
    except MlocError as exc:
        task_failed(api, task_id, exc)
    if json_out:
        output.print_json(answer)
    elif "checkpoint" in answer:
        start = (
            f"continues from {answer['checkpoint']} (step {answer['from_step']})"
            if answer["checkpoint"]
            else "saved no checkpoint, so it starts over"
        )
        output.line(f"resumed {answer['task_id']}: it {start} once a worker takes it (mloc show {answer['task_id']})")
    else:
        redone = answer.get("chunks_redone") or []
        output.line(
            f"resumed {answer['task_id']}: {answer.get('chunks_kept', 0)} finished chunk(s) kept, "
            f"{len(redone)} to run again"
            + (f" (keeping the {answer['rows_kept']:,} rows they had done)" if answer.get("rows_kept") else "")
            + f", then the rest of the data (mloc show {answer['task_id']})"
        )
    waiting = answer.get("dependents_waiting") or []
    if waiting and not json_out:
        names = ", ".join(
            f"{step['name']} ({step['task_id'][:SHORT_ID]})" if step["name"] else step["task_id"] for step in waiting
        )
        output.line(f"{len(waiting)} task(s) that ended with it wait for it again: {names}")


# ----------------------------------------------------------------------- logs
LOST_EXIT = 3  # the orchestrator went away while a task was followed
SINCE_FORMS = (
    "a duration ago (30s, 10m, 2h, 1d), a local time (07:35, 2026-05-09 07:35:00), today, yesterday, "
    "unix seconds, or an ISO 8601 time with its zone"
)
_CLOCK = re.compile(r"^\d{1,2}:\d{2}(?::\d{2})?$")
_PASSED_ON = re.compile(r"^(?:(?:\d+(?:\.\d+)?[smhd])+|\d+-\d+|\d{9,11}(?:\.\d+)?)$")
_TEXT_STYLE = {"mloc": "bold", "library": "dim"}


def _since_option(value: str | None) -> str | None:
    """``--since`` as the API takes it: local times (as `mloc logs` shows them) become unix seconds."""
    if value is None:
        return None
    text = value.strip().lower()
    if _PASSED_ON.match(text):
        return text
    today = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
    if text in ("today", "yesterday"):
        return repr((today - timedelta(days=1 if text == "yesterday" else 0)).timestamp())
    try:
        if _CLOCK.match(text):
            clock = datetime.strptime(text if text.count(":") == 2 else text + ":00", "%H:%M:%S")
            moment = today.replace(hour=clock.hour, minute=clock.minute, second=clock.second)
        else:
            moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a time; give {SINCE_FORMS}") from None
    return repr(moment.timestamp())  # a time without a zone is local, as the log's times are shown


def _log_line(entry: dict[str, Any], *, chunks: bool = False) -> None:
    try:
        stamp = output.when(float(entry["ts"])) if entry.get("ts") else ""
    except (TypeError, ValueError):
        stamp = output.visible(entry["ts"], one_line=True)
    level = str(entry.get("level") or "")
    source = str(entry.get("source") or "")
    part = next((name for name in ("chunk", "replica") if name in entry), None)
    where = (f"{part} {entry[part]}" if part else "task").ljust(10) if chunks else ""
    head = " ".join(part for part in (stamp, level.ljust(7), where, source.ljust(8)) if part.strip())
    style = {"ERROR": "red", "CRITICAL": "red", "WARNING": "yellow"}.get(level.upper(), "dim")
    text = output.visible(entry.get("text", entry.get("message", "")))
    output.line(
        output.styled(output.visible(head, one_line=True), style), output.styled(text, _TEXT_STYLE.get(source, ""))
    )


def _chunk_logs(
    api: Client, task_id: str, own: list[dict[str, Any]], sources: str | None, tail: int | None, since: str | None
) -> list[dict[str, Any]]:
    """A dataset task's log lines and its chunks' (a replica group's and its replicas'), in time order,
    each chunk's marked with its number."""
    record = api.task(task_id)
    if not record.get("children"):
        output.error_line(
            f"task {task_id} is neither a dataset task nor a replica group, so it has no chunks; drop --chunks"
        )
        raise typer.Exit(2)
    part = "chunk" if record.get("chunk_rows") else "replica"
    entries = list(own)
    for index, child in enumerate(record.get("children") or []):
        try:
            lines = api.all_logs(child, source=sources, tail=tail, since=since)["lines"]
        except ApiError as exc:
            if exc.status_code != 404:
                raise
            continue  # a chunk forgotten past its retention: its lines went with it
        entries.extend({**entry, part: index} for entry in lines)
    entries.sort(key=lambda entry: float(entry.get("ts") or 0))  # stable: a chunk's own order holds on ties
    return entries[-tail:] if tail else entries


def _no_lines(api: Client, task_id: str, *, matching: bool) -> None:
    that = " that match" if matching else ""
    try:
        ended = api.task(task_id)["state"] in ("succeeded", "failed", "cancelled")
    except MlocError:
        ended = False
    output.line(f"task {task_id} has no log lines{that}{'' if ended else ' (yet)'}", stderr=True)


def _lost(api: Client, task_id: str) -> NoReturn:
    """One line when the orchestrator goes away while a task is followed: the task itself goes on."""
    output.error_line(
        f"lost the orchestrator at {api.base_url}; the task goes on — follow it again with `mloc logs -f {task_id}`"
    )
    raise typer.Exit(LOST_EXIT)


@app.command()
def logs(
    task_id: TaskIdArg,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing until the task ends.")] = False,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            "-s",
            help="Only these sources (repeat, or comma-separate): mloc (lifecycle), executor, library, stdout, stderr.",
        ),
    ] = None,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=1, max=10_000, help="Only the last N lines.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", callback=_since_option, help=f"Lines from then on: {SINCE_FORMS}.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON (with -f: one JSON object a line).")] = False,
    with_chunks: Annotated[
        bool,
        typer.Option(
            "--chunks",
            help="A dataset task's chunks' (a replica group's replicas') lines too, in time order, marked (no -f).",
        ),
    ] = False,
    fmt: OutputFormat = None,
) -> None:
    """Print a task's log: time, level, source and text of each line (MLOC's own lifecycle lines, the
    executor's, and captured library output). -f follows it and ends with the task's final state.
    A dataset task's own log says when each chunk started and ended; --chunks adds its chunks' lines.

    Exit status with -f: 0 when the task succeeded, 1 when it failed or was cancelled, 3 when the
    orchestrator went away (the task goes on)."""
    api = client()
    as_json = wants_json(json_out, fmt)
    sources = ",".join(source) if source else None
    if with_chunks and follow:
        output.error_line(
            "--chunks does not follow: -f follows the dataset task's own log, which says each chunk's start and "
            "end (or follow one chunk: mloc logs -f CHUNK_ID); drop -f to print every chunk's lines so far"
        )
        raise typer.Exit(2)
    full_id = task_id
    try:
        full_id = api.resolve(task_id)
        if not follow:
            body = api.all_logs(full_id, source=sources, tail=tail, since=since)
            if with_chunks:
                body = {**body, "lines": _chunk_logs(api, full_id, body["lines"], sources, tail, since)}
            if as_json:
                output.print_json(body)
                return
            for entry in body["lines"]:
                _log_line(entry, chunks=with_chunks)
            if not body["lines"]:
                _no_lines(api, full_id, matching=bool(sources or since))
            return
        for entry in api.follow_logs(full_id, source=sources, tail=tail, since=since):
            if as_json:
                output.json_line(entry)
            if entry.get("end"):
                state, reason = str(entry.get("state")), str(entry.get("reason") or "")
                said = f"task {full_id} ended: {state}" + (f" ({reason})" if reason and state != "succeeded" else "")
                if not as_json:
                    style = waiting.STATE_STYLE.get(state, "bold")
                    output.line(output.styled(output.visible(said, one_line=True), style), stderr=True)
                if state != "succeeded":
                    raise typer.Exit(1)
            elif not as_json:
                _log_line(entry)
    except Lost as exc:
        if follow:
            _lost(api, full_id)
        output.fail(exc)
    except MlocError as exc:
        task_failed(api, full_id, exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# -------------------------------------------------------------------- metrics
@app.command()
def metrics(
    task_id: TaskIdArg,
    limit: Annotated[int, typer.Option(min=1, max=5000, help="The last N steps.")] = 1000,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """A task's training metrics per step (loss, learning rate, reward...), oldest first."""
    api = client()
    try:
        body = api.metrics(task_id, limit=limit)
    except MlocError as exc:
        task_failed(api, task_id, exc)
    if wants_json(json_out, fmt):
        output.print_json(body)
        return
    rows: list[dict[str, Any]] = body.get("metrics") or []
    if not rows:
        output.line(f"task {body.get('task_id', task_id)} has reported no metrics (training tasks report them)")
        return
    # The run (attempt) that logged each step, beside it: a resumed task's steps go on from a checkpoint.
    columns = ["step", "run"] if any("run" in row for row in rows) else ["step"]
    for row in rows:
        columns.extend(name for name in row if name not in columns)
    grid = output.table(*(output.visible(c, one_line=True) for c in columns))
    for row in rows:
        grid.add_row(*(_number(row.get(c)) for c in columns))
    output.show(grid)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return output.visible(value, one_line=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
