"""Chunked dataset tasks: an inference task that reads a dataset runs as chunks of rows, each a task of
its own, under a parent task that has no worker (as a replica group's does).

Why tasks: a chunk is then what a worker takes (a free slot anywhere takes the next one, so a fast
worker takes more), what the reaper hands back when a worker is lost (the chunk, never the finished
ones), and what a resume runs again. The row count is not known at submit (the file is the worker's
to read), so chunks are cut as they are needed: ``inference.input.chunk_rows`` rows each, at most
``resources.replicas`` of them unfinished at once. A chunk's result says whether rows lie past it
(``more``); the first that says no is the last, and once every chunk up to it has succeeded the
parent's result lines are the chunks' lines joined in row order.

The parent settles here, in the orchestrator (called by :mod:`mloc.orchestrator.groups`), under a
lock per parent, since settling now also cuts new chunks and two orchestrators must not cut the
same one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import LockError

from mloc import artifacts, keys, moves, tasklog
from mloc.errors import Conflict, MlocError, NotFound
from mloc.executors.base import write_json_atomic
from mloc.orchestrator.cancel import cancel, stopped_with
from mloc.records import NewTask, TaskRecord
from mloc.settings import Settings
from mloc.spec.dataset import (
    CHUNK_LABEL,
    COUNTED_BYTES,
    DEFAULT_CHUNK_ROWS,
    RESULT_LINES,
    ROW_PRINTS,
)
from mloc.state import TERMINAL, Reason, TaskState
from mloc.store import TaskStore, task_not_found

log = logging.getLogger(__name__)
PARENT_LABEL = "mloc.parent"
# Longest a settle or resume may hold a parent's lock (it is released as soon as it is done).
LOCK_SEC = 120
# A chunk's field: the last of its moves its parent's log has said: how it ended, or "running/N" for
# the start of its attempt N.
TOLD = "told_parent"
# The parent's field: seconds it spent failed or cancelled before its resumes, left out of its run's time.
STOPPED_SEC = "stopped_sec"
# Usage fields that add up over a task's parts (chunks here, a replica group's shards too).
SUMMED = ("prompt_tokens", "completion_tokens", "total_tokens", "num_requests")


def is_chunked(document: dict[str, Any]) -> bool:
    """Whether a task (wire form) runs as chunks: an inference task that reads a dataset, and is not a
    chunk itself."""
    spec = document.get("spec") or {}
    labels = (document.get("metadata") or {}).get("labels") or {}
    return (
        spec.get("taskType") == "inference"
        and bool((spec.get("inference") or {}).get("input"))
        and (CHUNK_LABEL not in labels)
    )


def chunk_rows(document: dict[str, Any]) -> int:
    return int(document["spec"]["inference"]["input"].get("chunk_rows") or DEFAULT_CHUNK_ROWS)


def chunk_count(document: dict[str, Any]) -> int | None:
    """How many chunks the task's ``max_rows`` allows, or None without one (the data says when it ends)."""
    source = document["spec"]["inference"]["input"]
    if source.get("max_rows") is None:
        return None
    return max(1, -(-int(source["max_rows"]) // chunk_rows(document)))


def chunk_document(document: dict[str, Any], name: str, parent_id: str, index: int) -> dict[str, Any] | None:
    """The task of chunk ``index`` (wire form), or None when the task's ``max_rows`` ends before it."""
    size = chunk_rows(document)
    source = document["spec"]["inference"]["input"]
    rows = size
    if source.get("max_rows") is not None:
        rows = min(size, int(source["max_rows"]) - index * size)
        if rows <= 0:
            return None
    child = copy.deepcopy(document)
    child["metadata"]["name"] = f"{name}-c{index}"
    labels = child["metadata"].setdefault("labels", {})
    labels[PARENT_LABEL], labels[CHUNK_LABEL] = parent_id, str(index)
    child["spec"]["resources"]["replicas"] = 1
    window = child["spec"]["inference"]["input"]
    window["skip_rows"] = int(source.get("skip_rows") or 0) + index * size
    window["max_rows"] = rows
    window.pop("chunk_rows", None)
    return child


def child_record(parent: dict[str, str], index: int) -> NewTask | None:
    """Chunk ``index`` of the parent whose hash is ``parent``: it runs as the parent would (owner,
    priority, retries, what it asks of a worker), so its record is the parent's with its own window."""
    document = json.loads(parent["spec"])
    child = chunk_document(document, parent["name"], parent["id"], index)
    if child is None:
        return None
    record = NewTask(
        task_id=str(uuid.uuid4()),
        name=child["metadata"]["name"],
        owner=parent["owner"],
        task_type=parent["task_type"],
        kind=parent["kind"],
        topic=parent["topic"],
        priority=int(parent.get("priority", "0")),
        max_attempts=int(parent.get("max_attempts", "1")),
        # The parent's submit time and place in the queue: its chunks keep them, however late they are cut.
        created_at=float(parent["created_at"]),
        order_ms=int(parent.get("created_ms") or float(parent["created_at"]) * 1000),
        document=child,
        request=json.loads(parent.get("req") or "{}"),
        memory_estimate=json.loads(parent["memory_estimate"]) if parent.get("memory_estimate") else None,
        labels=child["metadata"]["labels"],
        submitted_by=parent.get("submitted_by", ""),
        parent_id=parent["id"],
        replica=index,
        cut_at=time.time(),
    )
    if parent.get("retry_backoff_sec"):
        record.retry_backoff_sec = float(parent["retry_backoff_sec"])
    if parent.get("retry_backoff_max_sec"):
        record.retry_backoff_max_sec = float(parent["retry_backoff_max_sec"])
    return record


def first_chunks(parent: NewTask) -> list[NewTask]:
    """The chunks cut at submit: as many as may run at once (``resources.replicas``)."""
    parent.chunk_rows = chunk_rows(parent.document)
    parent.chunk_window = max(1, int(parent.document["spec"]["resources"].get("replicas") or 1))
    h = parent.to_hash()
    children = [c for index in range(parent.chunk_window) if (c := child_record(h, index)) is not None]
    parent.group_size = len(children)
    parent.children = [c.task_id for c in children]
    parent.pending_reason = "waiting for its first chunk to start"
    return children


async def settle(store: TaskStore, parent_id: str, settings: Settings) -> bool:
    """Bring a chunked parent up to date with its chunks; True once it has ended (or is gone). A
    parent another orchestrator is settling is marked again for the next wake-up."""
    lock = store.redis.lock(keys.group_lock(parent_id), timeout=LOCK_SEC, blocking=False)
    if not await lock.acquire():
        await store.redis.sadd(keys.GROUPS_TO_SETTLE, parent_id)
        return False
    try:
        return await _settle(store, parent_id, settings)
    finally:
        with contextlib.suppress(LockError):
            await lock.release()


def _carry_lines(carried: list[tuple[Path, Path]]) -> int:
    """Copy each replaced chunk's result lines, row fingerprints and counted bytes into its new chunk's
    folder, where its run keeps them as it would its own earlier attempt's (and readers of the task's
    lines see them meanwhile); returns how many rows they hold. A chunk whose files are not here
    (another results dir, an artifact store) runs all its rows again."""
    rows = 0
    for old, new in carried:
        if not (old / RESULT_LINES).is_file() or not (old / ROW_PRINTS).is_file():
            continue
        try:
            new.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The prints first: lines without theirs are not kept, prints without lines are cut. With no
            # count, no recorded run counted the lines (each of its runs was lost): the new run does.
            for name in (ROW_PRINTS, COUNTED_BYTES, RESULT_LINES):
                if name == COUNTED_BYTES and not (old / name).is_file():
                    continue
                shutil.copyfile(old / name, new / name)
                (new / name).chmod(0o600)  # as the worker writes them: results are the task owner's
            rows += rows_written(new / RESULT_LINES)
        except OSError as exc:
            log.warning("the finished lines of chunk %s were not carried over (%s); its rows run again", old.name, exc)
            shutil.rmtree(new, ignore_errors=True)
    return rows


def rows_written(lines: Path) -> int:
    """The rows a chunk's result lines hold: whole lines (a line cut off by a stop is run again)."""
    try:
        with lines.open("rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0  # none written, or not on this disk


async def _chunk_rows(store: TaskStore, children: list[str]) -> list[list[str | None]]:
    pipe = store.redis.pipeline(transaction=False)
    for child in children:
        pipe.hmget(
            keys.task(child),
            "state",
            "reason",
            "started_at",
            "result_summary",
            "worker_id",
            "finished_at",
            TOLD,
            "attempts",
            "reason_code",
        )
    return await pipe.execute()


async def _tell(
    store: TaskStore, h: dict[str, str], document: dict[str, Any], children: list[str], rows: list[list[str | None]]
) -> None:
    """Say in the parent's log each chunk's start and end not said yet (:func:`tell_parts`)."""
    size = chunk_rows(document)
    limit = document["spec"]["inference"]["input"].get("max_rows")

    def span(index: int) -> str:
        last = (index + 1) * size if limit is None else min((index + 1) * size, int(limit))
        return f"rows {index * size + 1:,}-{last:,}"

    def succeeded(index: int) -> str:
        result = json.loads(rows[index][3] or "{}")
        count = int(result.get("rows") or 0)
        text = f"rows {index * size + 1:,}-{index * size + count:,}" if count else "no rows (past the data's end)"
        if result.get("failed"):
            text += f", {int(result['failed']):,} of them failed"
        if result.get("kept_rows"):
            text += f", {int(result['kept_rows']):,} kept from an earlier run"
        return text

    # Each chunk's row less its summary (read by ``succeeded``) and its reason code (read by ``_settle``).
    ends = [[*row[:3], *row[4:8]] for row in rows]
    await tell_parts(store, h["id"], "chunk", children, ends, span, succeeded)


async def tell_parts(
    store: TaskStore,
    parent_id: str,
    part: str,
    children: list[str],
    rows: Sequence[Sequence[str | None]],
    span: Callable[[int], str],
    succeeded: Callable[[int], str],
) -> None:
    """Say in a parent's log each of its parts' (chunks', replicas') start and end not said yet, so its
    own log tells the run (the parts' logs hold their lines). ``rows``: each part's state, reason,
    started_at, worker_id, finished_at, what was told of it (:data:`TOLD`) and attempts; ``span`` says
    what a part holds, ``succeeded`` what a part that succeeded did. A part that started and ended
    between two settles has its end said alone."""
    lines: list[tasklog.Line] = []
    told: list[tuple[str, str]] = []
    for index, (child, row) in enumerate(zip(children, rows, strict=True)):
        state, reason, started, worker, finished, said, attempts = row
        if state in (TaskState.RUNNING, TaskState.CANCELLING):
            state = f"{TaskState.RUNNING}/{attempts}"  # a start is told once per attempt
        if not state or state == said:
            continue
        name = f"{part} {index} ({child[:8]})"
        if state.startswith(f"{TaskState.RUNNING}/"):
            again = " again" if (said or "").startswith(f"{TaskState.RUNNING}/") else ""
            lines.append(tasklog.Line(f"{part}_started", f"{name} started{again} on {worker}: {span(index)}"))
        elif TaskState(state) in TERMINAL:
            took = f" in {float(finished) - float(started):.1f} s" if started and finished else ""
            on = f" on {worker}" if worker else ""
            if state == TaskState.SUCCEEDED:
                lines.append(tasklog.Line(f"{part}_succeeded", f"{name} succeeded{on}{took}: {succeeded(index)}"))
            else:
                level = "WARNING" if state == TaskState.CANCELLED else "ERROR"
                text = f"{name} {state}{on}: {reason or 'no reason given'}"
                lines.append(tasklog.Line(f"{part}_{state}", text, level))
        else:
            continue
        told.append((child, state))
    if not lines:
        return
    pipe = store.redis.pipeline(transaction=False)
    for child, state in told:
        pipe.hset(keys.task(child), TOLD, state)
    await pipe.execute()
    await tasklog.append(store.redis, parent_id, *lines)


async def _settle(store: TaskStore, parent_id: str, settings: Settings) -> bool:
    h = await store.get_hash(parent_id)
    if not h:
        return True
    state = TaskState(h["state"])
    if state == TaskState.SUCCEEDED:
        return True
    children: list[str] = json.loads(h.get("children") or "[]")
    rows = await _chunk_rows(store, children)
    document = json.loads(h["spec"])
    await _tell(store, h, document, children, rows)
    states = [TaskState(row[0]) if row[0] else TaskState.CANCELLED for row in rows]
    summaries = [
        json.loads(row[3] or "{}") if s == TaskState.SUCCEEDED else {} for s, row in zip(states, rows, strict=True)
    ]
    if state.terminal:
        # Failed or cancelled, with a chunk that ended after it (it finished before its cancel reached
        # it): its end is told, and the rows a resume keeps are counted.
        await _note_stopped(store, parent_id, children, states, summaries, settings)
        return True
    for index, chunk_state in enumerate(states):
        if chunk_state in (TaskState.FAILED, TaskState.CANCELLED):
            why = rows[index][1] or "no reason given"
            code = rows[index][8]
            if code in (Reason.DEPENDENCY_FAILED, Reason.CONDITION_NOT_MET):
                # Its chunks waited with it: the task never started, for the reason its wait ended.
                await _end(store, parent_id, children, states, chunk_state, why, code=Reason(code))
                return True
            why = f"chunk {index} ({children[index]}) {chunk_state}: {why}"
            await _end(store, parent_id, children, states, chunk_state, why)
            await _note_stopped(store, parent_id, children, states, summaries, settings)
            return True
    allowed = int(document["spec"]["inference"]["input"].get("max_row_errors") or 0)
    bad = sum(int(s.get("failed") or 0) for s in summaries)
    if bad > allowed:
        why = (
            f"{bad:,} bad rows over its chunks, beyond inference.input.max_row_errors ({allowed:,}); their lines "
            "carry the errors: fix the rows, or raise max_row_errors and submit again"
        )
        await _end(store, parent_id, children, states, TaskState.FAILED, why)
        await _note_stopped(store, parent_id, children, states, summaries, settings)
        return True
    # The last chunk read the data's last row, or the last the task's max_rows allows (it says there
    # are more: there are, in the data, past the task's own window).
    allowed_chunks = chunk_count(document)
    last = next(
        (i for i, s in enumerate(summaries) if s and (not s.get("more") or i + 1 == allowed_chunks)),
        None,
    )
    if last is not None and all(s == TaskState.SUCCEEDED for s in states[: last + 1]):
        unread = await _succeed(store, h, children[: last + 1], rows, settings)
        if unread is not None:
            # Its reason says whether a resume helps: the generic offer would speak of chunks not finished.
            await _note_progress(store, parent_id, children[: last + 1], summaries[: last + 1])
            await _end(store, parent_id, children, states, TaskState.FAILED, unread, code=Reason.REPLICA_FAILED)
            return True
        for child, chunk_state in zip(children[last + 1 :], states[last + 1 :], strict=True):
            if chunk_state not in TERMINAL:  # cut before the end was known: nothing to read
                with contextlib.suppress(MlocError):
                    await cancel(
                        store,
                        child,
                        by=f"dataset task {parent_id}",
                        reason=f"not needed: the data ended before its rows (dataset task {parent_id} has them all)",
                        reason_code=Reason.PAST_THE_DATA,
                    )
        return True
    if state == TaskState.PENDING and any(s != TaskState.PENDING and s != TaskState.ASSIGNED for s in states):
        starts = [float(row[2]) for row in rows if row[2]]
        fields = {"started_at": repr(min(starts, default=time.time())), "pending_reason": ""}
        await store.transition(parent_id, moves.GROUP_START, fields=fields)
    if last is None:
        await _cut_more(store, h, children, states)
    await _note_progress(store, parent_id, children, summaries)
    return False


async def _note_progress(
    store: TaskStore, parent_id: str, children: list[str], summaries: list[dict[str, Any]], *, kept: int = 0
) -> None:
    """The parent's progress: the rows its finished chunks did (and, once it stopped, the ``kept`` rows
    its unfinished chunks had written, which a resume keeps)."""
    done = [s for s in summaries if s]
    rows_done = sum(int(s.get("rows") or 0) for s in done)
    failed = sum(int(s.get("failed") or 0) for s in done)
    message = rows_message(rows_done, failed, len(done), unfinished=len(children) - len(done))
    if kept:
        message += f", which had done {kept:,} rows that a resume keeps"
    progress = {"step": rows_done, "total": None, "unit": "rows", "message": message, "ts": time.time()}
    await store.set_fields(parent_id, {"progress": json.dumps(progress)})


async def _note_stopped(
    store: TaskStore,
    parent_id: str,
    children: list[str],
    states: list[TaskState],
    summaries: list[dict[str, Any]],
    settings: Settings,
) -> None:
    """A stopped task's progress, with the rows its unfinished chunks had written, which a resume keeps
    (read from their folders; none when they are not on this disk)."""
    unfinished = [
        settings.results_dir / child for child, s in zip(children, states, strict=True) if s != TaskState.SUCCEEDED
    ]
    kept = sum(await asyncio.to_thread(lambda: [rows_written(folder / RESULT_LINES) for folder in unfinished]))
    await _note_progress(store, parent_id, children, summaries, kept=kept)


def rows_message(rows: int, failed: int, chunks: int, *, unfinished: int = 0) -> str:
    """A dataset task's progress in words: '12 rows done, 2 of them failed, in 3 chunk(s); 1 chunk not
    finished'. Failed rows are said: a task may succeed with some (``max_row_errors``)."""
    text = f"{rows:,} rows done" + (f", {failed:,} of them failed," if failed else "") + f" in {chunks} chunk(s)"
    if unfinished:
        # Chunks are cut as the data goes on: those not cut yet are not counted (the row count is not known).
        text += f"; {unfinished} cut chunk{'s' if unfinished != 1 else ''} not finished"
    return text


async def live_progress(store: TaskStore, record: TaskRecord) -> dict[str, Any] | None:
    """A running dataset task's progress with the rows its running chunks have done so far (the stored
    progress, written when a chunk ends, counts finished chunks only)."""
    stored = record.progress
    if record.state.terminal or not record.children:
        return stored
    pipe = store.redis.pipeline(transaction=False)
    for child in record.children:
        pipe.hmget(keys.task(child), "state", "progress", "result_summary")
    done = failed = finished = running = live = 0
    for state, progress, summary in await pipe.execute():
        if state == TaskState.SUCCEEDED:
            result = json.loads(summary or "{}")
            done += int(result.get("rows") or 0)
            failed += int(result.get("failed") or 0)
            finished += 1
        elif state in (TaskState.RUNNING, TaskState.CANCELLING):
            running += 1
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                said = json.loads(progress or "{}") or {}
                # Only rows add up: a chunk downloading its model reports bytes.
                live += int(said.get("step") or 0) if said.get("unit") == "rows" else 0
    if not running:
        return stored
    message = f"{live:,} rows done in {running} running chunk(s)"
    if finished:
        message = rows_message(done, failed, finished) + f"; {live:,} more in {running} running chunk(s)"
    return {"step": done + live, "total": None, "unit": "rows", "message": message, "ts": time.time()}


async def _cut_more(store: TaskStore, h: dict[str, str], children: list[str], states: list[TaskState]) -> None:
    """Cut chunks until ``chunk_window`` are unfinished (or the task's max_rows is reached)."""
    unfinished = sum(s not in TERMINAL for s in states)
    window = int(h.get("chunk_window") or 1)
    new: list[NewTask] = []
    while unfinished + len(new) < window:
        record = child_record(h, len(children) + len(new))
        if record is None:
            break
        new.append(record)
    if not new:
        return
    await store.insert(new)
    ids = children + [record.task_id for record in new]
    await store.set_fields(h["id"], {"children": json.dumps(ids), "group_size": str(len(ids))})


async def _end(
    store: TaskStore,
    parent_id: str,
    children: list[str],
    states: list[TaskState],
    chunk_state: TaskState,
    why: str,
    *,
    code: Reason | None = None,
) -> None:
    """Fail or cancel the parent, and cancel the chunks still going; finished chunks keep their lines
    for a resume. ``code``: the wait's end (its dependency failed, its gate skipped it), which no resume
    gets past, so none is offered."""
    move = moves.GROUP_CANCEL if chunk_state == TaskState.CANCELLED else moves.GROUP_FAIL
    if code is None:
        code = Reason.of_replica(chunk_state) if chunk_state == TaskState.CANCELLED else Reason.REPLICA_FAILED
        why += f"; `mloc resume {parent_id}` runs the chunks not finished and the rest of the data"
    fields = {
        "reason": why,
        "reason_code": code.value,
        "finished_at": repr(time.time()),
    }
    said = tasklog.stored(tasklog.ended(chunk_state, fields["reason"]))
    outcome = await store.apply(parent_id, moves.Change(move, fields=fields, log=(said,)))
    if not outcome.ok:
        return
    for child, child_state in zip(children, states, strict=True):
        if child_state not in TERMINAL:
            with contextlib.suppress(MlocError):
                how = "failed" if move == moves.GROUP_FAIL else "was cancelled"
                because = stopped_with(parent_id, dataset=True, how=how)
                await cancel(store, child, by=f"dataset task {parent_id}", reason=because)


async def _succeed(
    store: TaskStore,
    h: dict[str, str],
    children: list[str],
    rows: list[list[str | None]],
    settings: Settings,
) -> str | None:
    """Join the chunks' lines and record the task's success; or why their lines cannot be joined."""
    parent_id = h["id"]
    results = [await store.result(child) or {} for child in children]
    records = [await store.get(child, with_spec=False) for child in children]
    folder = settings.results_dir / parent_id
    try:
        await asyncio.to_thread(join_lines, settings, records, folder / RESULT_LINES)
    except NotFound as exc:
        # Its chunk succeeded and published nothing: no later settle finds more, and a resume keeps that chunk.
        return f"{exc.message}; then submit the task again"
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise  # a store's read that failed for now: the next settle tries again
        return _unwritable(exc, folder / RESULT_LINES, results, parent_id)
    starts = [float(row[2]) for row in rows if row[2]]
    started = float(h.get("started_at") or min(starts, default=time.time()))
    # Time it sat failed or cancelled before a resume is not its run's.
    stopped = float(h.get(STOPPED_SEC) or 0)
    usage = _usage(results, time.time() - started - stopped)
    first = results[0]
    merged = {
        "ok": True,
        **{k: first[k] for k in ("model", "engine", "dtype", "input") if k in first},
        "results_file": RESULT_LINES,
        "rows": sum(int(r.get("rows") or 0) for r in results),
        "succeeded": sum(int(r.get("succeeded") or 0) for r in results),
        "failed": sum(int(r.get("failed") or 0) for r in results),
        "chunks": len(children),
        "usage": usage,
    }
    try:
        write_json_atomic(folder / "responses.json", merged)
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        return _unwritable(exc, folder / "responses.json", results, parent_id)
    store_ = artifacts.store_for(settings)
    if store_ is not None:
        # Served from the store like any task's files: as the parent's one attempt.
        await asyncio.to_thread(store_.publish, parent_id, 1, "orchestrator", folder)
    now = time.time()
    rows_done = merged["rows"]
    message = rows_message(rows_done, merged["failed"], len(children))
    progress = {"step": rows_done, "total": rows_done, "unit": "rows", "message": message}
    fields = {
        "finished_at": repr(now),
        "usage": json.dumps(usage),
        "reason": "",
        "attempts": "1",
        "progress": json.dumps(progress | {"ts": now}),
    }
    said = tasklog.stored(tasklog.Line(TaskState.SUCCEEDED, f"succeeded in {now - started - stopped:.1f} s: {message}"))
    end = moves.Change(moves.GROUP_SUCCEED, result=merged, fields=fields, now=now, log=(said,))
    if TaskState(h["state"]) != TaskState.PENDING:
        await store.apply(parent_id, end)
        return None
    start = moves.Change(moves.GROUP_START, fields={"started_at": repr(started)}, now=now)
    await store.apply(parent_id, start, then=end)
    return None


def _unwritable(exc: OSError, target: Path, results: list[dict[str, Any]], parent_id: str) -> str:
    """Why a task whose chunks all finished did not: its own disk will not take what joins them, and no
    later settle would tell. Every chunk stands, so a resume (with none to run) joins them again."""
    rows = sum(int(r.get("rows") or 0) for r in results)
    return (
        f"its {rows:,} rows, all done, could not be joined into {target}: {exc.strerror or exc}; make room there "
        f"(or make it writable), then `mloc resume {parent_id}` joins them (every chunk's lines are kept)"
    )


def _usage(results: list[dict[str, Any]], wall: float) -> dict[str, float]:
    """The task's usage from its chunks': tokens and requests summed, model loading summed (each chunk
    loads or reuses a model), and time and speed the task's own: ``latency_sec`` from its first chunk's
    start to its end, ``tokens_per_sec`` the tokens generated (not kept) per second of that."""
    usage: dict[str, float] = {}
    generated = 0.0
    for result in results:
        used = result.get("usage") or {}
        for name in (*SUMMED, "load_sec"):
            value = used.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                usage[name] = usage.get(name, 0) + value
        generated += float(used.get("tokens_per_sec") or 0) * float(used.get("latency_sec") or 0)
    usage["latency_sec"] = round(wall, 4)
    usage["tokens_per_sec"] = round(generated / wall, 2) if wall > 0 else 0.0
    if "load_sec" in usage:
        usage["load_sec"] = round(usage["load_sec"], 4)
    return usage


# A results disk that will not take more: full, read-only, over quota, not ours to write.
UNWRITABLE = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)


def join_lines(settings: Settings, records: list[Any], target: Path) -> None:
    """The chunks' result lines, in chunk (so row) order, written to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for index, record in enumerate(records):
                try:
                    found = artifacts.listing(
                        settings, record.task_id, record.state.value, record.attempts, record.worker_id
                    )
                except NotFound as exc:
                    raise NotFound(f"the result lines of chunk {index} cannot be read: {exc.message}") from exc
                if not any(item.path == RESULT_LINES for item in found.items):
                    continue  # a chunk past the end wrote an empty file, or none
                with artifacts.open_artifact(settings, found, RESULT_LINES) as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def resume(store: TaskStore, parent_id: str, *, by: str, results_dir: Path) -> dict[str, Any]:
    """Run a failed or cancelled chunked task again from where it stopped: its succeeded chunks stand,
    every other chunk is cut afresh, with the lines its earlier chunk finished (copied into the new
    chunk's folder before it can be placed, where they are kept: see
    :class:`mloc.executors.inference_dataset.ResultLines`)."""
    lock = store.redis.lock(keys.group_lock(parent_id), timeout=LOCK_SEC, blocking_timeout=LOCK_SEC)
    if not await lock.acquire():
        raise Conflict(f"task {parent_id} is being settled; try again in a minute")
    try:
        h = await store.get_hash(parent_id)
        if not h:
            raise task_not_found(parent_id)
        if not h.get("chunk_rows") and h.get("parent_id"):
            raise Conflict(
                f"task {parent_id} is a part of task {h['parent_id']}: resume that task if it reads a dataset; "
                "a replica group runs again only whole: submit it again"
            )
        if not h.get("chunk_rows") and h.get("group_size"):
            raise Conflict(f"task {parent_id} is a replica group, which runs again only whole: submit it again")
        if not h.get("chunk_rows"):
            raise Conflict(
                f"task {parent_id} is neither a dataset task nor a training task, so nothing of its run is kept "
                "to resume from; submit it again"
            )
        state = TaskState(h["state"])
        if state not in (TaskState.FAILED, TaskState.CANCELLED):
            raise Conflict(f"task {parent_id} is {state}; only a failed or cancelled task is resumed")
        children: list[str] = json.loads(h.get("children") or "[]")
        states = [TaskState(row[0]) if row[0] else TaskState.CANCELLED for row in await _chunk_rows(store, children)]
        if any(s not in TERMINAL for s in states):
            raise Conflict(f"task {parent_id} still has chunks stopping; resume it once they have ended")
        redo = [i for i, s in enumerate(states) if s != TaskState.SUCCEEDED]
        new = [r for i in redo if (r := child_record(h, i)) is not None]
        carried = [(results_dir / children[i], results_dir / r.task_id) for i, r in zip(redo, new, strict=True)]
        rows_kept = await asyncio.to_thread(_carry_lines, carried)
        fields = {"reason": "", "reason_code": "", "finished_at": "", "pending_reason": ""}
        if h.get("started_at") and h.get("finished_at"):
            # From its end until now it ran nowhere: its run's time leaves that out.
            stopped = float(h.get(STOPPED_SEC) or 0) + max(0.0, time.time() - float(h["finished_at"]))
            fields[STOPPED_SEC] = repr(round(stopped, 3))
        kept = len(states) - len(redo)
        said = tasklog.Line(
            "resumed",
            f"resumed by {by}: {kept} finished chunk(s) kept; {len(redo)} cut chunk(s) not finished run again"
            + (f" (keeping the {rows_kept:,} rows they had done)" if rows_kept else "")
            + ", then the rows after them",
        )
        moved = await store.apply(
            parent_id, moves.Change(moves.GROUP_RESUME, fields=fields, log=(tasklog.stored(said),))
        )
        if not moved.ok:
            for _, folder in carried:
                shutil.rmtree(folder, ignore_errors=True)
            raise Conflict(f"task {parent_id} could not be resumed: {moved.error} {moved.detail}")
        if new:
            await store.insert(new)
        for index, record in zip(redo, new, strict=True):
            children[index] = record.task_id
        await store.set_fields(parent_id, {"children": json.dumps(children), "resumed_by": by})
        pipe = store.redis.pipeline(transaction=False)
        pipe.sadd(keys.GROUPS_OPEN, parent_id)
        pipe.sadd(keys.GROUPS_TO_SETTLE, parent_id)
        await pipe.execute()
    finally:
        with contextlib.suppress(LockError):
            await lock.release()
    return {
        "ok": True,
        "task_id": parent_id,
        "state": TaskState.RUNNING.value,
        "chunks_kept": kept,
        "chunks_redone": redo,
        "rows_kept": rows_kept,
    }
