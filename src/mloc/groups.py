"""Replica groups: an inference task with ``resources.replicas > 1`` is split into shard tasks, one per
replica, placed on different workers where possible. The parent task has no worker of its own: it
becomes running when its first shard starts, and the worker that finishes the last shard merges the
shards' results into the parent's responses.json, in prompt order.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from mloc import keys, lifecycle
from mloc.errors import SpecError
from mloc.executors.base import write_json_atomic
from mloc.spec import Document
from mloc.state import TERMINAL, TaskState
from mloc.store import TaskStore

log = logging.getLogger(__name__)
PARENT_LABEL = "mloc.parent"
OFFSET_LABEL = "mloc.offset"
# Usage fields that add up over shards; the rest (latency) take the slowest shard.
_SUMMED = ("prompt_tokens", "completion_tokens", "total_tokens", "num_requests")


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
        for name, value in (result.get("usage") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                usage[name] = usage.get(name, 0) + value if name in _SUMMED else max(usage.get(name, 0), value)
    items.sort(key=lambda item: (item["index"], item.get("sample", 0)))
    first = results[0]
    merged = {k: v for k, v in first.items() if k not in ("items", "usage")}
    merged.update({"ok": all(r.get("ok", True) for r in results), "items": items, "usage": usage})
    merged["replicas"] = len(results)
    return merged


async def shard_started(store: TaskStore, parent_id: str) -> None:
    await store.transition(
        parent_id,
        TaskState.RUNNING,
        sources=[TaskState.PENDING],
        fields={"started_at": repr(time.time()), "pending_reason": ""},
    )


async def shard_finished(store: TaskStore, parent_id: str, results_dir: Path) -> None:
    """Settle the parent once every shard has ended: merge on success, fail or cancel otherwise."""
    parent = await store.get(parent_id, with_spec=False)
    if parent.state.terminal:
        return
    pipe = store.redis.pipeline(transaction=False)
    for child in parent.children:
        pipe.hmget(keys.task(child), "state", "reason", "labels")
    rows = await pipe.execute()
    states = [TaskState(row[0]) for row in rows]
    for index, (state, row) in enumerate(zip(states, rows, strict=True)):
        if state in (TaskState.FAILED, TaskState.CANCELLED):
            outcome = await store.transition(
                parent_id,
                state,
                sources=[TaskState.PENDING, TaskState.RUNNING],
                fields={
                    "reason": f"replica {index} ({parent.children[index]}) {state}: {row[1] or 'no reason given'}",
                    "reason_code": f"replica_{state}",
                    "finished_at": repr(time.time()),
                },
            )
            if outcome.ok:
                for sibling, sibling_state in zip(parent.children, states, strict=True):
                    if sibling_state not in TERMINAL:
                        try:
                            await lifecycle.cancel(store, sibling, by=f"replica group {parent_id}")
                        except Exception as exc:  # the sibling may end meanwhile
                            log.debug("could not cancel %s: %s", sibling, exc)
            return
    if not all(state == TaskState.SUCCEEDED for state in states):
        return
    results = [await store.result(child) for child in parent.children]
    offsets = [int(json.loads(row[2] or "{}").get(OFFSET_LABEL, 0)) for row in rows]
    merged = merge(parent_id, results, offsets)
    write_json_atomic(results_dir / parent_id / "responses.json", merged)
    await store.transition(
        parent_id,
        TaskState.SUCCEEDED,
        sources=[TaskState.RUNNING, TaskState.PENDING],
        result=merged,
        fields={"finished_at": repr(time.time()), "usage": json.dumps(merged["usage"]), "reason": ""},
    )
