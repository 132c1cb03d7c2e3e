"""Another task's output that a task names by id, turned into a folder on this worker's disk.

Two references name a training task's output by its id: ``model.adapter.path: <id>`` (what
``model.adapter.from`` becomes at submit) loads the LoRA adapter it saved, and ``model.source: {type:
task, identifier: <id>}`` (what ``model.source.from`` becomes) the model it merged with
``hyperparameters.merge_adapter: true``. The worker reads where that task recorded the output (its
``adapter`` or ``merged_model`` artifact), after checking the task is the owner's (or the asking task is
the admin's, who may name any).

The path recorded is on the disk of the worker that trained. When this worker does not have it (another
host, no shared RESULTS_DIR) and an artifact store is configured, the folder is copied from the task's
published files into ``<models dir>/task-outputs/<id>/<attempt>/`` once, complete or not at all (a
temporary folder renamed into place), and later tasks on this worker load that copy.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mloc import artifacts, keys
from mloc.errors import ConfigError, ExecutionError
from mloc.modelroots import TASK_ID
from mloc.settings import Settings
from mloc.state import TaskState

COPIES_DIR = "task-outputs"


@dataclass(frozen=True)
class _Reference:
    field: str  # where the task names it, for messages
    artifact: str  # the producing task's artifact that holds the folder
    hint: str  # what to name instead


ADAPTER = _Reference("model.adapter.path", "adapter", "name a succeeded sft, dpo, grpo or ppo task, or a LoRA folder")
MERGED = _Reference(
    "model.source",
    "merged_model",
    "name a succeeded sft, dpo, grpo or ppo task with hyperparameters.merge_adapter: true, or load its adapter "
    "with model.adapter.from",
)


async def resolve_task_outputs(
    redis: aioredis.Redis,
    settings: Settings,
    models_dir: Path,
    document_data: dict[str, Any],
    owner: str,
    *,
    trusted: bool,
) -> dict[str, Any]:
    """The document with its task-id adapter and model source replaced by folders on this worker."""
    model = document_data["spec"].get("model") or {}
    adapter = str((model.get("adapter") or {}).get("path") or "")
    source = model.get("source") or {}
    if not TASK_ID.match(adapter) and source.get("type") != "task":
        return document_data
    resolved = copy.deepcopy(document_data)
    if TASK_ID.match(adapter):
        path = await _output_folder(redis, settings, models_dir, adapter, owner, ADAPTER, trusted=trusted)
        resolved["spec"]["model"]["adapter"]["path"] = path
    if source.get("type") == "task":
        reference = str(source.get("identifier") or "")
        path = await _output_folder(redis, settings, models_dir, reference, owner, MERGED, trusted=trusted)
        resolved["spec"]["model"]["source"] = {"type": "local", "identifier": path}
    return resolved


async def _output_folder(
    redis: aioredis.Redis,
    settings: Settings,
    models_dir: Path,
    task_id: str,
    owner: str,
    what: _Reference,
    *,
    trusted: bool,
) -> str:
    task_owner, state, recorded, attempts = await redis.hmget(
        keys.task(task_id), "owner", "state", "artifacts", "attempts"
    )
    if state is None or (task_owner != owner and not trusted):
        # A user hears the same of another user's task as of none at all.
        known = "does not exist" if trusted else "is not one of your tasks"
        raise ExecutionError(f"{what.field} names task {task_id}, which {known}")
    produced = json.loads(recorded or "{}").get(what.artifact)
    if state != TaskState.SUCCEEDED or not produced:
        label = "adapter" if what is ADAPTER else "merged model"
        raise ExecutionError(f"task {task_id} has no {label} to load (it is {state}); {what.hint}")
    path = str(produced["path"])
    if Path(path).is_dir():
        return path
    return await asyncio.to_thread(_copy_from_store, settings, models_dir, task_id, int(attempts or 0), path, what)


def _copy_from_store(
    settings: Settings, models_dir: Path, task_id: str, attempt: int, path: str, what: _Reference
) -> str:
    """This worker's copy of the folder ``path`` the task ``task_id`` wrote on another host, from the store."""
    try:
        store = artifacts.store_for(settings)
    except ConfigError as exc:
        raise ExecutionError(f"{what.field}: the artifact store is misconfigured: {exc.message}") from exc
    if store is None:
        raise ExecutionError(
            f"{what.field} names task {task_id}, whose {what.artifact} folder {path} is on the disk of the worker "
            "that ran it, not on this one; set MLOC_ARTIFACT_STORE (e.g. s3://bucket/mloc) on the workers, or give "
            "them a shared RESULTS_DIR, so another host can load it"
        )
    # The folder's place inside the task's own folder is its place among the published files.
    parts = Path(path).parts
    if task_id not in parts:
        raise ExecutionError(f"task {task_id} recorded its {what.artifact} at {path}, outside its own folder")
    inside = "/".join(parts[parts.index(task_id) + 1 :])
    target = models_dir / COPIES_DIR / task_id / str(attempt) / inside
    if target.is_dir():
        return str(target)
    listing = store.listing(task_id, attempt)
    files = [item for item in (listing.items if listing else []) if item.path.startswith(inside + "/")]
    if not files:
        raise ExecutionError(
            f"{what.field} names task {task_id}, whose {what.artifact} is not on this worker and not among its "
            f"files in the artifact store {store.url} (attempt {attempt}); run the task again with the store set"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for item in files:
            local = staging / item.path[len(inside) + 1 :]
            local.parent.mkdir(parents=True, exist_ok=True)
            with store.open(task_id, attempt, item.path) as remote, open(local, "wb") as out:
                shutil.copyfileobj(remote, out, artifacts.CHUNK)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not another task's copy that landed first
                raise
    except OSError as exc:
        raise ExecutionError(
            f"could not copy task {task_id}'s {what.artifact} from the artifact store {store.url}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
