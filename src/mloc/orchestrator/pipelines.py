"""Pipelines: tasks that wait for tasks, and outputs handed from one to the next.

A task names what it waits for in ``spec.dependsOn`` (names of tasks in the same submission, or ids of
existing tasks of the same user), or by using another task's output (:mod:`mloc.spec.references`: an adapter, a
merged model, result lines, a vector collection, eval scores). A submission is planned whole before
anything is stored: names resolved, outputs checked against what the producing task makes, and the
graph checked for cycles; then every task is stored in one atomic write, those that wait out of every
queue. A task with ``spec.when`` runs only if an eval task's score passes (:mod:`.conditions`).

Nothing is kept in memory: a waiting task's record lists what it waits for (``waiting_on``) and each of
those lists it among its dependents (:func:`mloc.keys.dependents`). When such a task ends, the
transition script marks it (``keys.DEPS_ENDED``) and wakes the scheduler, whose loop calls
:func:`release_marked`: a dependent whose tasks all succeeded joins the queue (``lua.RELEASE``); one
whose task failed or was cancelled fails (or, with ``onDependencyFailure: skip``, is cancelled), and one
whose task a gate skipped is skipped too (a branch not taken); each marks its own dependents in turn.
The reaper's :func:`sweep` looks at every waiting task, in case a mark was lost with an orchestrator.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from mloc import counters, keys, lua, moves, tasklog
from mloc.errors import MlocError, NotFound, SpecError
from mloc.orchestrator import chunks, conditions
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.placement import Request, request_of
from mloc.orchestrator.users import Principal
from mloc.records import NewTask
from mloc.spec import Document, references, taskgraph, validate
from mloc.spec.references import Producer
from mloc.state import Reason, TaskState
from mloc.store import TaskStore
from mloc.transition import COUNTED_END, pending_score

RELEASE_BATCH = 100

Builder = Callable[[Document, Principal], tuple[NewTask, Request]]

# A worker's capability naming the vector store folder its rag_inference tasks read (host:folder).
VECTOR_STORES = "vector_stores"


def waits(document: Document, wire: dict[str, Any] | None = None) -> bool:
    """Whether the task waits for another; ``wire`` is its wire form, where the caller has it."""
    spec = document.spec
    return bool(spec.depends_on or spec.when or references.find(document.to_wire() if wire is None else wire))


def needs_planning(documents: list[Document], wires: list[dict[str, Any]] | None = None) -> bool:
    """Whether any task waits for another (so the submission is planned as a graph); ``wires``: the
    documents' wire forms, where the caller has them."""
    if wires is None:
        return any(waits(document) for document in documents)
    return any(waits(document, wire) for document, wire in zip(documents, wires, strict=True))


@dataclass
class Step:
    """One task of a submission as planned: its record (a chunked task's parent), the records stored
    with it (its first chunks), and the ids of the tasks it waits for."""

    name: str
    document: Document
    record: NewTask
    request: Request
    chunks: list[NewTask] = field(default_factory=list)
    depends_on: list[str] = field(default_factory=list)

    @property
    def task_id(self) -> str:
        return self.record.task_id


@dataclass
class Plan:
    steps: list[Step]
    pipeline_id: str | None
    graph: str | None
    # Tasks stored waiting only for tasks that already succeeded (a condition to check): settled at once.
    settle_now: list[str] = field(default_factory=list)

    def records(self) -> list[NewTask]:
        return [record for step in self.steps for record in (step.record, *step.chunks)]

    def queued(self) -> list[tuple[NewTask, Request]]:
        """The tasks that may be placed at once."""
        placeable = []
        for step in self.steps:
            for record in step.chunks or [step.record]:
                if record.queued:
                    placeable.append((record, step.request))
        return placeable


async def plan(store: TaskStore, documents: list[Document], principal: Principal, build: Builder) -> Plan:
    """Resolve names and references, check outputs and cycles, and build every record; raises
    :class:`SpecError` naming the document, the field and the fix. Nothing is stored."""
    names: dict[str, int] = {}
    for index, document in enumerate(documents):
        name = document.metadata.name
        if name:
            if name in names:
                raise _error(index, "metadata.name", taskgraph.duplicate_name(name))
            names[name] = index
    steps = [
        Step(document.metadata.name or f"task-{index}", document, *build(document, principal))
        for index, document in enumerate(documents)
    ]
    external: dict[str, dict[str, str]] = {}

    async def resolve(index: int, entry: str, where: str) -> tuple[str, Producer]:
        """The id of the task ``entry`` names, and what is known of it."""
        if entry in names:
            other = names[entry]
            if other == index:
                raise _error(index, where, taskgraph.names_itself(entry))
            # Its record's spec: its own references are rewritten already when it came first.
            producer = Producer(documents[other].spec.task_type, steps[other].record.document["spec"])
            return steps[other].task_id, producer
        h = external.get(entry) or await store.get_hash(entry)
        if not h and taskgraph.TASK_ID_OR_PREFIX.fullmatch(entry):
            entry = await _by_prefix(store, entry, principal, index, where)
            h = external.get(entry) or await store.get_hash(entry)
        if not h or (not principal.admin and h.get("owner") != principal.name):
            raise _error(index, where, taskgraph.names_nothing(entry, list(names)))
        external[entry] = h
        return entry, Producer.stored(h)

    gates: dict[str, set[str]] = {}  # a task with spec.when -> the eval tasks its condition reads
    origins: dict[str, dict[str, str]] = {}
    for index, step in enumerate(steps):
        # The record's form, which holds what building it added (the admin's default timeout).
        wire = copy.deepcopy(step.record.document)
        deps: list[str] = []
        named_at: dict[str, str] = {}  # each task waited for -> the field that first named it
        shortened = False
        for position, entry in enumerate(step.document.spec.depends_on):
            where = f"spec.dependsOn[{position}]"
            task_id, _ = await resolve(index, entry, where)
            if task_id != entry:  # a short id is stored as the id it named
                wire["spec"]["dependsOn"][position] = task_id
                shortened = True
            deps.append(task_id)
            named_at.setdefault(task_id, where)
        found = references.find(wire)
        for reference in found:
            task_id, producer = await resolve(index, reference.entry, reference.where)
            refused = references.problem(reference, reference.entry, producer, step.document)
            if refused:
                raise _error(index, reference.where, refused)
            references.rewrite(wire, reference, task_id, producer)
            if reference.output == references.Output.SCORES:
                gates.setdefault(step.task_id, set()).add(task_id)
            if task_id not in deps:
                deps.append(task_id)
            named_at.setdefault(task_id, reference.where)
        if found or shortened:
            try:
                step.document = validate(wire)
            except SpecError as exc:
                raise _error(index, "spec", exc.message) from exc
            step.record.document = step.document.to_wire()
            # What admission asked of a GPU for it (its memory estimate) stays: references change no size.
            step.request = replace(request_of(step.document), gpu_mem=step.request.gpu_mem)
            step.record.request = step.request.to_json()
        step.depends_on = deps
        origins[step.task_id] = named_at
    _check_cycles(steps)

    pipeline_id = str(uuid.uuid4()) if len(steps) > 1 or any(step.depends_on for step in steps) else None
    settle_now: list[str] = []
    for index, step in enumerate(steps):
        waiting = []
        gate = gates.get(step.task_id, set())
        for task_id in step.depends_on:
            h = external.get(task_id)
            if h is None:
                waiting.append(task_id)  # a task of this submission: never ended yet
                continue
            state = TaskState(h["state"])
            if state in (TaskState.FAILED, TaskState.CANCELLED):
                raise _error(
                    index,
                    origins[step.task_id].get(task_id, "spec.dependsOn"),
                    f"task {task_id} ({h.get('name', '')}) {state}, so this task could never run; submit that "
                    "task again and name the new one",
                )
            # An eval task a condition reads is waited for even when it succeeded: the release reads its scores.
            if state != TaskState.SUCCEEDED or task_id in gate:
                waiting.append(task_id)
        step.record.pipeline_id = pipeline_id
        if chunks.is_chunked(step.record.document):
            step.chunks = chunks.first_chunks(step.record)
        if waiting and all(external.get(task_id, {}).get("state") == TaskState.SUCCEEDED for task_id in waiting):
            settle_now.extend(record.task_id for record in step.chunks or [step.record])
        # A chunked task's chunks wait, not its parent (which is never queued).
        for record in step.chunks or [step.record]:
            record.pipeline_id = pipeline_id
            record.waiting_on = list(waiting)
            if waiting:
                record.pending_reason = waiting_reason(waiting, {s.task_id: s.name for s in steps}, external)
        if waiting and step.chunks:
            step.record.pending_reason = step.chunks[0].pending_reason
    graph = None
    if pipeline_id is not None:
        # The pipeline is its tasks' owner's (the admin may submit for someone): theirs to read by id.
        owners = {step.record.owner for step in steps}
        graph = json.dumps(
            {
                "id": pipeline_id,
                "owner": owners.pop() if len(owners) == 1 else principal.name,
                "created_at": time.time(),
                "tasks": [{"name": s.name, "task_id": s.task_id, "depends_on": s.depends_on} for s in steps],
            }
        )
    return Plan(steps, pipeline_id, graph, settle_now)


async def settle_ready(store: TaskStore, plan: Plan) -> None:
    """Once the plan is stored: release or skip the tasks whose condition reads eval tasks that had
    succeeded already (no end of theirs will mark them)."""
    for task_id in plan.settle_now:
        await settle_dependent(store, task_id)


def _check_cycles(steps: list[Step]) -> None:
    index = {step.task_id: position for position, step in enumerate(steps)}
    edges = [[index[task_id] for task_id in step.depends_on if task_id in index] for step in steps]
    cycle = taskgraph.find_cycle(edges)
    if cycle:
        raise SpecError(
            taskgraph.cycle_message([steps[position].name for position in cycle]) + "; nothing was stored",
            details=[{"path": "spec.dependsOn", "message": "cycle", "fix": "make the graph acyclic"}],
        )


async def _by_prefix(store: TaskStore, prefix: str, principal: Principal, index: int, where: str) -> str:
    """The one task of the caller's whose id starts with ``prefix``; the prefix itself when none does."""
    found = await store.ids_starting_with(prefix, None if principal.admin else principal.name, most=3)
    if len(found) > 1:
        shown = ", ".join(sorted(found)[:3])
        raise _error(index, where, f"{prefix!r} is the start of several task ids ({shown}); give more characters")
    return found[0] if found else prefix


def _error(index: int, where: str, message: str) -> SpecError:
    return SpecError(
        f"task {index + 1} of the submission: {where}: {message}; nothing was stored",
        details=[{"index": index, "path": where, "message": message}],
    )


def waiting_reason(waiting: list[str], names: dict[str, str], external: dict[str, dict[str, str]]) -> str:
    def label(task_id: str) -> str:
        name = names.get(task_id) or external.get(task_id, {}).get("name") or ""
        return f"{name} ({task_id[:8]})" if name else task_id[:8]

    return f"waiting for {', '.join(label(t) for t in waiting)} to succeed"


# ------------------------------------------------------------------------------------------- release
async def release_marked(store: TaskStore, *, limit: int = RELEASE_BATCH) -> int:
    """Release or end the dependents of the tasks that ended since the last call; returns how many
    ended tasks were looked at."""
    ended = await store.redis.spop(keys.DEPS_ENDED, limit) or []
    for task_id in ended:
        for dependent in await store.redis.smembers(keys.dependents(task_id)):
            await settle_dependent(store, dependent)
    return len(ended)


async def sweep(store: TaskStore) -> int:
    """Look at every waiting task (the fallback for a mark lost with an orchestrator); returns how many
    still wait."""
    still = 0
    for task_id in await store.redis.smembers(keys.DEPS_WAITING):
        still += await settle_dependent(store, task_id)
    return still


async def settle_dependent(store: TaskStore, task_id: str) -> bool:
    """Release ``task_id`` if every task it waits for succeeded, end it if one failed or was
    cancelled; True while it still waits."""
    redis = store.redis
    state, waiting_raw, priority, created_ms, spec_raw, reason = await redis.hmget(
        keys.task(task_id), "state", "waiting_on", "priority", "created_ms", "spec", "pending_reason"
    )
    if state != TaskState.PENDING or not waiting_raw:
        await redis.srem(keys.DEPS_WAITING, task_id)
        return False
    waiting: list[str] = json.loads(waiting_raw)
    pipe = redis.pipeline(transaction=False)
    for parent in waiting:
        pipe.hmget(keys.task(parent), "state", "name", "reason", "reason_code")
    parents = await pipe.execute()
    spec = json.loads(spec_raw or "{}").get("spec", {})
    for parent, (parent_state, name, why, why_code) in zip(waiting, parents, strict=True):
        if parent_state == TaskState.CANCELLED and why_code == Reason.CONDITION_NOT_MET:
            # A branch not taken: what waits for a skipped step is skipped with it, not failed.
            text = f"skipped: the task it depends on, {name or ''} ({parent}), was {why or 'skipped'}"
            await _end_waiting(store, task_id, skip=True, reason=text, code=Reason.CONDITION_NOT_MET)
            return False
        if parent_state in (None, TaskState.FAILED, TaskState.CANCELLED):
            ended = "is gone" if parent_state is None else f"{parent_state}: {why or 'no reason given'}"
            skip = spec.get("onDependencyFailure") == "skip"
            # A failed task's reason is read after "failed:" (mloc show, the log); a skipped one is cancelled.
            text = f"{'skipped: ' if skip else ''}the task it depends on, {name or ''} ({parent}), {ended}"
            await _end_waiting(store, task_id, skip=skip, reason=text, code=Reason.DEPENDENCY_FAILED)
            return False
    names = {parent: row[1] or "" for parent, row in zip(waiting, parents, strict=True)}
    left = [parent for parent, row in zip(waiting, parents, strict=True) if row[0] != TaskState.SUCCEEDED]
    if not left:
        verdict = await conditions.decide(store, spec.get("when"), names)
        if verdict is not None and not verdict.run:
            code = Reason.CONDITION_NOT_MET if verdict.skip else Reason.DEPENDENCY_FAILED
            await _end_waiting(store, task_id, skip=verdict.skip, reason=verdict.reason, code=code)
            return False
        needs = await needs_at_release(redis, spec, waiting)
        if needs:
            await _add_needs(store, task_id, needs)
        if verdict is not None:
            # Its log keeps which score let it through, as a skipped step's reason keeps what stopped it.
            await tasklog.append(redis, task_id, tasklog.Line("condition_met", verdict.reason))
        score = pending_score(int(priority or 0), int(created_ms or 0))
        await redis.eval(
            lua.RELEASE,
            5,
            keys.task(task_id),
            keys.PENDING,
            keys.PENDING_OWNERS,
            keys.DEPS_WAITING,
            keys.SCHEDULER_WAKE,
            repr(score),
            keys.pending_of("{id}"),
            f"{verdict.reason}; waiting for the scheduler" if verdict is not None else "waiting for the scheduler",
        )
        return False
    text = waiting_reason(left, names, {})
    if text != reason:
        await store.set_fields(task_id, {"pending_reason": text})
    return True


async def _end_waiting(store: TaskStore, task_id: str, *, skip: bool, reason: str, code: Reason) -> None:
    """End a waiting task that will not run: cancelled when skipped, else failed."""
    fields = {
        "reason": reason,
        "reason_code": code.value,
        "finished_at": repr(time.time()),
        "pending_reason": "",
        "waiting_on": "",
    }
    # Refused only when it moved meanwhile (cancelled by its user): either way it waits no more.
    line = tasklog.Line(TaskState.CANCELLED, reason, "WARNING") if skip else tasklog.ended(TaskState.FAILED, reason)
    said = tasklog.stored(line)
    move = moves.CANCEL if skip else moves.DEPENDENCY_FAIL
    task_type, owner = await store.redis.hmget(keys.task(task_id), "task_type", "owner")
    # It ends without a run to record it: counted here, once, as its worker would have.
    usage = counters.ended(task_type or "", move.target) if owner else None
    await store.apply(task_id, moves.Change(move, fields=fields, log=(said,), usage=usage, owner=owner))
    await store.redis.srem(keys.DEPS_WAITING, task_id)


async def rearm_dependents(store: TaskStore, task_id: str, *, by: str) -> list[dict[str, str]]:
    """After ``task_id`` was resumed, the tasks that ended because it had failed or was cancelled wait
    for it again, and theirs for them, so the pipeline goes on once it succeeds; returns their ids and names.
    A dataset step waits again with its chunks (they wait, it is never queued). A task that also waits
    for another failed task is left ended."""
    rearmed: list[str] = []
    name = await store.redis.hget(keys.task(task_id), "name")
    said = tasklog.Line("waiting", f"waits again: {f'{name} ({task_id[:8]})' if name else task_id} was resumed by {by}")
    causes = [task_id]
    graphs: dict[str, dict[str, Any]] = {}  # the pipelines' graphs, each read once
    while causes:
        cause = causes.pop(0)
        for dependent in sorted(await store.redis.smembers(keys.dependents(cause))):
            # A dataset step's chunks are what wait: the step is re-armed whole, through its first chunk.
            step = await store.redis.hget(keys.task(dependent), "parent_id") or dependent
            if step not in rearmed and await _rearm(store, step, said, graphs):
                rearmed.append(step)
                causes.append(step)
    pipe = store.redis.pipeline(transaction=False)
    for dependent in rearmed:
        pipe.hget(keys.task(dependent), "name")
    return [{"task_id": i, "name": n or ""} for i, n in zip(rearmed, await pipe.execute(), strict=True)]


_REARM_FIELDS = ("state", "reason_code", "pipeline_id", "priority", "created_ms", "group_size", "chunk_rows")


async def _rearm(store: TaskStore, task_id: str, said: tasklog.Line, graphs: dict[str, dict[str, Any]]) -> bool:
    redis = store.redis
    h = dict(zip(_REARM_FIELDS, await redis.hmget(keys.task(task_id), *_REARM_FIELDS), strict=True))
    if h["state"] not in (TaskState.FAILED, TaskState.CANCELLED) or h["reason_code"] != Reason.DEPENDENCY_FAILED:
        return False
    if h["group_size"] and not h["chunk_rows"]:
        return False  # a replica group, which runs only whole: submitted again, never re-armed
    pipeline_id = h["pipeline_id"] or ""
    if pipeline_id and pipeline_id not in graphs:
        raw = await redis.get(keys.pipeline(pipeline_id))
        graphs[pipeline_id] = {node["task_id"]: node for node in (json.loads(raw)["tasks"] if raw else [])}
    steps = graphs.get(pipeline_id, {})
    if task_id not in steps:
        return False
    waiting: list[str] = steps[task_id]["depends_on"]
    pipe = redis.pipeline(transaction=False)
    for parent in waiting:
        pipe.hmget(keys.task(parent), "state", "name")
    parents = await pipe.execute()
    if any(row[0] in (None, TaskState.FAILED, TaskState.CANCELLED) for row in parents):
        return False
    names = {parent: row[1] or "" for parent, row in zip(waiting, parents, strict=True)}
    left = [parent for parent, row in zip(waiting, parents, strict=True) if row[0] != TaskState.SUCCEEDED]
    fields = {
        "reason": "",
        "reason_code": "",
        "finished_at": "",
        "waiting_on": json.dumps(waiting),
        "pending_reason": waiting_reason(left or waiting, names, {}),
        COUNTED_END: "",
    }
    if not h["chunk_rows"]:
        if not await _wait_again(store, task_id, fields, said):
            return False
        if not left:
            await settle_dependent(store, task_id)  # what it waits for has succeeded meanwhile: released now
        return True
    # A dataset step: its chunks wait again, and it waits with them (pending, never queued itself).
    if not await _wait_again(store, task_id, {**fields, "waiting_on": ""}, said):
        return False
    children: list[str] = json.loads(await redis.hget(keys.task(task_id), "children") or "[]")
    rewaited = [child for child in children if await _wait_again(store, child, fields, said)]
    await redis.sadd(keys.GROUPS_OPEN, task_id)
    if not left:
        for child in rewaited:
            await settle_dependent(store, child)
    return True


async def _wait_again(store: TaskStore, task_id: str, fields: dict[str, str], said: tasklog.Line) -> bool:
    """Move a task that ended for a failed dependency back to waiting; False when it is not so ended."""
    wanted = ("state", "reason_code", "priority", "created_ms")
    fetched = wanted + counters.TAKEN_BACK_FIELDS
    h = dict(zip(fetched, await store.redis.hmget(keys.task(task_id), *fetched), strict=True))
    if h["state"] not in (TaskState.FAILED, TaskState.CANCELLED) or h["reason_code"] != Reason.DEPENDENCY_FAILED:
        return False
    change = moves.Change(
        moves.REWAIT,
        fields=fields,
        waits=True,
        priority=int(h["priority"] or 0),
        created_ms=int(h["created_ms"] or 0),
        log=(tasklog.stored(said),),
        # Its end for a dependency was counted in its owner's usage; it will end again.
        **await counters.taken_back(store.redis, {name: value for name, value in h.items() if value is not None}),
    )
    return (await store.apply(task_id, change)).ok


async def _add_needs(store: TaskStore, task_id: str, needs: list[tuple[str, str]]) -> None:
    """Add capabilities to a waiting task's stored placement request before it joins the queue."""
    redis = store.redis
    raw = await redis.hget(keys.task(task_id), "req")
    if not raw:
        return
    request = json.loads(raw)
    have = [list(pair) for pair in request.get("needs", [])]
    request["needs"] = have + [list(pair) for pair in needs if list(pair) not in have]
    await redis.hset(keys.task(task_id), "req", json.dumps(request))


# ------------------------------------------------------------------------------------------- reading
async def graph(store: TaskStore, pipeline_id: str, principal: Principal) -> dict[str, Any]:
    """A pipeline's tasks, each with what it waits for and its state now."""
    raw = await store.redis.get(keys.pipeline(pipeline_id))
    if raw is None:
        raise NotFound(f"pipeline {pipeline_id} not found")
    body = json.loads(raw)
    if not principal.admin and body["owner"] != principal.name:
        raise NotFound(f"pipeline {pipeline_id} not found")
    pipe = store.redis.pipeline(transaction=False)
    for node in body["tasks"]:
        pipe.hmget(keys.task(node["task_id"]), "state", "reason", "pending_reason", "worker_id", "reason_code")
    for node, (state, reason, pending_reason, worker, code) in zip(body["tasks"], await pipe.execute(), strict=True):
        node.update({"state": state, "reason": reason, "pending_reason": pending_reason, "worker_id": worker})
        node["skipped"] = state == TaskState.CANCELLED and code == Reason.CONDITION_NOT_MET
    # A step skipped by its gate (or with a skipped step) took the branch not chosen: an outcome, not a failure.
    states = {"succeeded" if node["skipped"] else node["state"] for node in body["tasks"]}
    body["state"] = pipeline_state(states)
    body["ok"] = True
    return body


async def resume_refusal(store: TaskStore, task_id: str) -> str | None:
    """Why a task may not be resumed for what it waits for (None when nothing stops it): a gate said no,
    or a task it waits for has not succeeded, so it would run without what that task makes."""
    code, reason, pipeline_id, waiting_raw = await store.redis.hmget(
        keys.task(task_id), "reason_code", "reason", "pipeline_id", "waiting_on"
    )
    if code == Reason.CONDITION_NOT_MET:
        return (
            f"task {task_id} was skipped by a gate ({reason or 'spec.when'}), which stands; to run it anyway, "
            "submit it again without spec.when"
        )
    raw = await store.redis.get(keys.pipeline(pipeline_id)) if pipeline_id else None
    steps = {node["task_id"]: node for node in (json.loads(raw)["tasks"] if raw else [])}
    waited = steps[task_id]["depends_on"] if task_id in steps else json.loads(waiting_raw or "[]")
    pipe = store.redis.pipeline(transaction=False)
    for parent in waited:
        pipe.hmget(keys.task(parent), "state", "name")
    unmet = [
        f"{name or parent} ({parent[:8]}), which {'is gone' if state is None else f'is {state}'}"
        for parent, (state, name) in zip(waited, await pipe.execute(), strict=True)
        if state != TaskState.SUCCEEDED
    ]
    if not unmet:
        return None
    return (
        f"task {task_id} waits for {', '.join(unmet)}: it would run without what that makes; submit it again "
        "(with the tasks it waits for, or naming their succeeded runs by id in dependsOn)"
    )


def pipeline_state(states: set[str | None]) -> str:
    """A pipeline's state from its steps' (a skipped step counted as succeeded; None: a step whose record
    retention removed, so it had ended, no one knows how): running while any step has not ended, "ended"
    when every step has and the records left tell of no failure or cancel but some are gone."""
    if states & {TaskState.PENDING, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING}:
        return "running"
    if TaskState.FAILED in states:
        return "failed"
    if TaskState.CANCELLED in states:
        return "cancelled"
    return "ended" if None in states else "succeeded"


async def cancel_pipeline(store: TaskStore, pipeline_id: str, principal: Principal) -> dict[str, Any]:
    """Cancel every task of the pipeline that has not ended, the last steps first (so none is failed
    for its dependency's cancel before it is cancelled itself)."""
    body = await graph(store, pipeline_id, principal)
    cancelled = []
    for node in reversed(body["tasks"]):
        if node["state"] in ("succeeded", "failed", "cancelled", None):
            continue
        try:
            await cancel(store, node["task_id"], by=principal.name)
            cancelled.append(node["task_id"])
        except MlocError:
            continue  # it ended meanwhile
    return {"ok": True, "pipeline_id": pipeline_id, "cancelled": cancelled}


async def needs_at_release(redis: aioredis.Redis, spec: dict[str, Any], parents: list[str]) -> list[tuple[str, str]]:
    """What a task's placement needs that only its parents' runs tell: a rag_inference task that uses
    a named collection one of them indexed runs where that collection is (the vector store the
    indexing worker advertised)."""
    options = spec.get("hyperparameters") or {}
    if spec.get("taskType") == "agent_inference":
        collection, vector_db = options.get("retriever_collection"), options.get("retriever_vector_db")
    elif spec.get("taskType") == "rag_inference":
        collection, vector_db = options.get("collection"), options.get("vector_db")
    else:
        return []
    if not collection or not parents:
        return []
    pipe = redis.pipeline(transaction=False)
    for parent in parents:
        pipe.hmget(keys.task(parent), "task_type", "result_summary")
    for task_type, summary in await pipe.execute():
        if task_type != "rag_inference" or not summary:
            continue
        result = json.loads(summary)
        store = result.get("vector_store")
        if result.get("collection") == collection and result.get("vector_db") == vector_db and store:
            return [(VECTOR_STORES, str(store))]
    return []
