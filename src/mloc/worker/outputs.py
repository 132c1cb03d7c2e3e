"""Another task's output that a task names by id, turned into what its executor opens.

``model.source: {type: task, identifier: <id>}`` (what ``model.source.from`` becomes at submit) is the
model a training task saved with ``hyperparameters.merge_adapter: true``: the worker reads where that
task recorded it (its ``merged_model`` artifact) and hands the executor a local source, after checking
the task is the owner's (or the task is the admin's, who may name any).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.errors import ExecutionError
from mloc.state import TaskState


async def resolve_merged_model(
    redis: aioredis.Redis, document_data: dict[str, Any], owner: str, *, trusted: bool
) -> dict[str, Any]:
    """The document with a task-id model source replaced by that task's merged model folder."""
    source = (document_data["spec"].get("model") or {}).get("source") or {}
    if source.get("type") != "task":
        return document_data
    reference = str(source.get("identifier") or "")
    task_owner, state, recorded = await redis.hmget(keys.task(reference), "owner", "state", "artifacts")
    if state is None or (task_owner != owner and not trusted):
        # A user hears the same of another user's task as of none at all.
        what = "does not exist" if trusted else "is not one of your tasks"
        raise ExecutionError(f"model.source names task {reference}, which {what}")
    produced = json.loads(recorded or "{}").get("merged_model")
    if state != TaskState.SUCCEEDED or not produced:
        raise ExecutionError(
            f"task {reference} has no merged model to load (it is {state}); name a succeeded sft, dpo, grpo or ppo "
            "task with hyperparameters.merge_adapter: true, or load its adapter with model.adapter.from"
        )
    resolved = copy.deepcopy(document_data)
    resolved["spec"]["model"]["source"] = {"type": "local", "identifier": produced["path"]}
    return resolved
