"""Replica groups: an inference task with ``resources.replicas > 1`` is split into shard tasks, one per
replica, placed on different workers where possible. The parent task has no worker of its own.

Groups settle here, in the orchestrator, and nowhere else. Data flows one way: a worker records
its shard's start and end like any task's (it does not know groups exist); that same transition
marks the parent in Redis (``keys.GROUPS_TO_SETTLE``) and wakes the scheduler; the orchestrator's
scheduler loop then settles the marked parents (:func:`settle_marked`): running when its first
shard starts, and once every shard has ended, the merged result (in prompt order) or the first
failure or cancellation. The parent's result is stored in Redis like any task's, and its
responses.json is written to this orchestrator's RESULTS_DIR, where its artifacts are served from.
A mark can be lost with an orchestrator that dies mid-way, so the reaper also sweeps every open
group (:func:`sweep`). Settling twice is harmless: each move is a compare-and-set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, moves, tasklog
from mloc.errors import MlocError, SpecError
from mloc.executors.base import write_json_atomic
from mloc.orchestrator import chunks
from mloc.orchestrator.cancel import cancel, stopped_with
from mloc.records import TaskRecord
from mloc.settings import Settings
from mloc.spec import Document
from mloc.spec.base import OFFSET_LABEL
from mloc.state import TERMINAL, Reason, TaskState
from mloc.store import TaskStore

log = logging.getLogger(__name__)
# Parents settled per wake-up; the rest stay marked for the next one.
SETTLE_BATCH = 100


def shards(document: Document, name: str) -> list[dict[str, Any]]:
    """The shard documents: contiguous slices of the prompts (then chat conversations)."""
    spec = document.spec
    inputs = spec.inference  # type: ignore[attr-defined]
    prompts, messages = list(inputs.prompts), list(inputs.messages)
    total = len(prompts) + len(messages)
    replicas = spec.resources.replicas
    if replicas > total:
        raise SpecError(
            f"spec.resources.replicas is {replicas} but the task has {total} prompt(s); use at most {total} replicas",
            details=[
                {"path": "spec.resources.replicas", "message": f"{replicas} > {total} prompts", "fix": f"<= {total}"}
            ],
        )
    wire = document.to_wire()
    result = []
    base, extra = divmod(total, replicas)
    start = 0
    for index in range(replicas):
        end = start + base + (1 if index < extra else 0)
        child = copy.deepcopy(wire)
        child["metadata"]["name"] = f"{name}-r{index}"
        child["spec"]["resources"]["replicas"] = 1
        child["spec"]["inference"]["prompts"] = prompts[start : min(end, len(prompts))]
        child["spec"]["inference"]["messages"] = [
            [m.model_dump() for m in conversation]
            for conversation in messages[
                max(start, len(prompts)) - len(prompts) : max(end, len(prompts)) - len(prompts)
            ]
        ]
        child["metadata"].setdefault("labels", {})[OFFSET_LABEL] = str(start)
        result.append(child)
        start = end
    return result


def merge(parent_id: str, results: list[dict[str, Any]], offsets: list[int]) -> dict[str, Any]:
    """One result from the shards' results, item indices mapped back to the parent's prompts."""
    items = []
    usage: dict[str, float] = {}
    for result, offset in zip(results, offsets, strict=True):
        for item in result.get("items", []):
            items.append({**item, "index": item["index"] + offset})
        # Counts add up over shards; the rest (latency) take the slowest shard.
        for name, value in (result.get("usage") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                usage[name] = usage.get(name, 0) + value if name in chunks.SUMMED else max(usage.get(name, 0), value)
    items.sort(key=lambda item: (item["index"], item.get("sample", 0)))
    first = results[0]
    merged = {k: v for k, v in first.items() if k not in ("items", "usage")}
    merged.update({"ok": all(r.get("ok", True) for r in results), "items": items, "usage": usage})
    merged["replicas"] = len(results)
    return merged


async def settle(store: TaskStore, parent_id: str, results_dir: Path, settings: Settings | None = None) -> bool:
    """Bring a group's parent up to date with its shards; True once the parent has ended (or is gone)."""
    h = await store.get_hash(parent_id)
    if not h:
        return True
    if h.get("chunk_rows"):
        settings = settings or Settings().model_copy(update={"results_dir": results_dir})
        return await chunks.settle(store, parent_id, settings)
    state = TaskState(h["state"])
    children: list[str] = json.loads(h.get("children") or "[]")
    pipe = store.redis.pipeline(transaction=False)
    for child in children:
        pipe.hmget(
            keys.task(child),
            "state",
            "reason",
            "labels",
            "started_at",
            "worker_id",
            "finished_at",
            chunks.TOLD,
            "attempts",
        )
    rows = await pipe.execute()
    await _tell(store, h, children, rows)
    if state.terminal:
        return True
    states = [TaskState(row[0]) if row[0] else TaskState.CANCELLED for row in rows]  # a forgotten shard: gone
    for index, (shard_state, row) in enumerate(zip(states, rows, strict=True)):
        if shard_state in (TaskState.FAILED, TaskState.CANCELLED):
            await _end(store, parent_id, children, states, index, row[1])
            return True
    if all(shard_state == TaskState.SUCCEEDED for shard_state in states):
        await _succeed(store, parent_id, children, rows, started=state != TaskState.PENDING, results_dir=results_dir)
        return True
    if state == TaskState.PENDING and any(
        s in (TaskState.RUNNING, TaskState.CANCELLING, TaskState.SUCCEEDED) for s in states
    ):
        await store.transition(parent_id, moves.GROUP_START, fields=_started(rows))
    return False


async def _tell(store: TaskStore, h: dict[str, str], children: list[str], rows: list[list[str | None]]) -> None:
    """Say in the parent's log each replica's start and end not said yet (:func:`chunks.tell_parts`): its
    prompts, its worker, how long it ran, why it stopped."""
    inference = json.loads(h.get("spec") or "{}").get("spec", {}).get("inference", {})
    total = len(inference.get("prompts") or []) + len(inference.get("messages") or [])
    offsets = [int(json.loads(row[2] or "{}").get(OFFSET_LABEL, 0)) for row in rows] + [total]

    def span(index: int) -> str:
        return f"prompts {offsets[index] + 1:,}-{offsets[index + 1]:,}"

    ends = [[*row[:2], *row[3:]] for row in rows]  # each replica's row less its labels
    await chunks.tell_parts(store, h["id"], "replica", children, ends, span, span)


async def live_progress(store: TaskStore, record: TaskRecord) -> dict[str, Any] | None:
    """A replica group's progress, from its replicas' (it reports none of its own): the prompts they
    have done of all they hold."""
    if not record.children:
        return record.progress
    pipe = store.redis.pipeline(transaction=False)
    for child in record.children:
        pipe.hget(keys.task(child), "progress")
    done = total = 0
    for raw in await pipe.execute():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            progress = json.loads(raw or "{}") or {}
            done += int(progress.get("step") or 0)
            total += int(progress.get("total") or 0)
    if not total:
        return record.progress
    message = f"{done:,} of {total:,} prompts done over {len(record.children)} replicas"
    percent = round(100 * done / total, 1)
    return {"step": done, "total": total, "percent": percent, "unit": "prompts", "message": message}


def _started(rows: list[list[str | None]]) -> dict[str, str]:
    """The parent's fields on starting: it started when its first shard did."""
    starts = [float(row[3]) for row in rows if row[3]]
    return {"started_at": repr(min(starts, default=time.time())), "pending_reason": ""}


async def _end(
    store: TaskStore, parent_id: str, children: list[str], states: list[TaskState], index: int, why: str | None
) -> None:
    """Fail or cancel the parent after shard ``index``, and cancel the shards still going."""
    shard_state = states[index]
    move = moves.GROUP_CANCEL if shard_state == TaskState.CANCELLED else moves.GROUP_FAIL
    reason = f"replica {index} ({children[index]}) {shard_state}: {why or 'no reason given'}"
    fields = {"reason": reason, "reason_code": Reason.of_replica(shard_state).value, "finished_at": repr(time.time())}
    said = tasklog.stored(tasklog.ended(shard_state, reason))
    outcome = await store.apply(parent_id, moves.Change(move, fields=fields, log=(said,)))
    if not outcome.ok:
        return
    for sibling, sibling_state in zip(children, states, strict=True):
        if sibling_state not in TERMINAL:
            try:
                how = "failed" if move == moves.GROUP_FAIL else "was cancelled"
                because = stopped_with(parent_id, dataset=False, how=how)
                await cancel(store, sibling, by=f"replica group {parent_id}", reason=because)
            except MlocError as exc:  # it ended meanwhile
                log.debug("could not cancel %s: %s", sibling, exc)


async def _succeed(
    store: TaskStore,
    parent_id: str,
    children: list[str],
    rows: list[list[str | None]],
    *,
    started: bool,
    results_dir: Path,
) -> None:
    results = [await store.result(child) for child in children]
    offsets = [int(json.loads(row[2] or "{}").get(OFFSET_LABEL, 0)) for row in rows]
    merged = merge(parent_id, results, offsets)
    write_json_atomic(results_dir / parent_id / "responses.json", merged)
    now = time.time()
    fields = {"finished_at": repr(now), "usage": json.dumps(merged["usage"]), "reason": ""}
    said = tasklog.stored(tasklog.Line(TaskState.SUCCEEDED, f"succeeded: its {len(children)} replicas succeeded"))
    end = moves.Change(moves.GROUP_SUCCEED, result=merged, fields=fields, now=now, log=(said,))
    if started:
        await store.apply(parent_id, end)
        return
    # Every shard ended before the parent was seen running: it starts and ends in one step.
    await store.apply(parent_id, moves.Change(moves.GROUP_START, fields=_started(rows), now=now), then=end)


async def settle_marked(
    store: TaskStore, results_dir: Path, *, limit: int = SETTLE_BATCH, settings: Settings | None = None
) -> int:
    """Settle the parents whose shards moved since the last call; returns how many were looked at.
    A parent is taken off the mark before it is read, so a shard that moves meanwhile marks it again;
    one that cannot be settled now stays open for the reaper's :func:`sweep`."""
    parents = await store.redis.spop(keys.GROUPS_TO_SETTLE, limit) or []
    for parent_id in parents:
        await _settle_open(store, parent_id, results_dir, settings)
    return len(parents)


async def sweep(store: TaskStore, results_dir: Path, settings: Settings | None = None) -> int:
    """Settle every open group, marked or not (the fallback for a mark lost with a dead orchestrator);
    returns how many are still open."""
    still_open = 0
    for parent_id in await store.redis.smembers(keys.GROUPS_OPEN):
        still_open += not await _settle_open(store, parent_id, results_dir, settings)
    return still_open


async def _settle_open(store: TaskStore, parent_id: str, results_dir: Path, settings: Settings | None) -> bool:
    try:
        settled = await settle(store, parent_id, results_dir, settings)
    except aioredis.RedisError:
        raise  # the caller's loop waits for Redis; the group stays open
    except Exception:
        # One group's bad shard result must not stop the loop that places every other task.
        log.exception("replica group %s could not be settled; the next sweep tries again", parent_id)
        return False
    if settled:
        await store.redis.srem(keys.GROUPS_OPEN, parent_id)
    return settled
