"""What a task needs from a worker, whether a worker fits it, and why not.

The reason a waiting task shows is built here, over the whole fleet and every check that fails, as
Kubernetes does for a pod ("0/3 workers fit: 2 have too few free GPUs (...); 1 has too little free
CPU (...)"), and ends with the fix when no worker could take the task at all (a topic nobody
listens to, an executor no worker has installed, a tool no worker switched on).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from mloc.records import WorkerStatus, WorkerView
from mloc.spec.base import Document, ModelSpec, field_of
from mloc.spec.eval import harness_data_fix
from mloc.spec.quantity import format_cpu, format_memory, readable_memory

# Agent tools a worker must switch on (MLOC_ALLOW_PYTHON_TOOL, MLOC_WEB_SEARCH_PROVIDER).
GATED_TOOLS = ("python_repl", "web_search")
CAPABILITY_WORDS = {
    "engines": "engine",
    "agent_tools": "agent tool",
    "harness_tasks": "harness task data",
    "vector_stores": "vector store (where the collection was indexed)",
}
# How a worker gets the executor of a built-in task type.
EXECUTOR_FIX = {
    "inference": "pip install 'mloc[inference]' on the worker (and 'mloc[vllm]' for vLLM)",
    "sft": "pip install 'mloc[train]' on the worker ('mloc[train,qlora]' for QLoRA)",
    "dpo": "pip install 'mloc[train]' on the worker",
    "grpo": "pip install 'mloc[train]' on the worker",
    "ppo": "run scripts/setup_ppo_env.sh and start the worker with MLOC_EXECUTOR_PYTHON=ppo=$PWD/.venv-ppo/bin/python",
    "rag_inference": "pip install 'mloc[rag,inference]' on the worker",
    "agent_inference": "pip install 'mloc[agent,inference]' on the worker",
}
CAPABILITY_FIX = {
    ("engines", "vllm"): "pip install 'mloc[vllm]' on a worker",
    ("engines", "transformers"): "pip install 'mloc[inference]' on a worker",
    ("agent_tools", "python_repl"): "start a worker with MLOC_ALLOW_PYTHON_TOOL=1",
    ("agent_tools", "web_search"): "start a worker with MLOC_WEB_SEARCH_PROVIDER set (see the README)",
    # Any value of the capability; {value} is the one missing.
    ("vector_stores", "*"): "start the worker that indexed the collection again, or share MLOC_VECTORS_DIR "
    "between workers",
}
SHOWN_PER_GROUP = 3


@dataclass(frozen=True)
class Request:
    """What a task needs from a worker."""

    task_type: str
    topic: str
    cpu: int = 0  # millicores
    mem: int = 0  # bytes
    gpu_count: int = 0
    gpu_type: str = "any"
    gpu_mem: int = 0
    tags: tuple[str, ...] = ()
    model: str | None = None
    # (capability, value) pairs the worker's executor must advertise, e.g. ("engines", "vllm").
    needs: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive copy costs several times this, and every submit pays it.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["tags"] = list(self.tags)
        data["needs"] = [list(pair) for pair in self.needs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        return cls(
            **{
                **data,
                "tags": tuple(data.get("tags", ())),
                "needs": tuple((str(k), str(v)) for k, v in data.get("needs", ())),
            }
        )


def request_of(document: Document) -> Request:
    spec = document.spec
    hw = spec.resources.hardware
    model = field_of(spec, "model")
    needs: list[tuple[str, str]] = []
    if isinstance(model, ModelSpec) and model.engine.value != "auto":
        needs.append(("engines", model.engine.value))
    for tool in field_of(field_of(spec, "hyperparameters"), "tools") or ():
        if tool in GATED_TOOLS:
            needs.append(("agent_tools", tool))
    # Harness tasks run only where their data is cached: workers advertise the ones they hold.
    for name in field_of(field_of(spec, "eval"), "tasks") or ():
        needs.append(("harness_tasks", name))
    return Request(
        task_type=spec.task_type,
        topic=spec.effective_topic,
        cpu=hw.cpu,
        mem=hw.memory,
        gpu_count=hw.gpu.count,
        gpu_type=hw.gpu.type,
        gpu_mem=hw.gpu.memory or 0,
        tags=tuple(spec.resources.tags),
        model=spec.model_identifier(),
        needs=tuple(needs),
    )


_NOISE = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def _gpu_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _NOISE]


def gpu_matches(requested: str, name: str) -> bool:
    """'any' matches every GPU; otherwise each token of the request must appear in the GPU's name,
    so 'a100' and 'A100-80GB' both match 'NVIDIA A100-SXM4-80GB'."""
    if requested.strip().lower() in ("", "any", "*"):
        return True
    wanted = _gpu_tokens(requested)
    have = set(_gpu_tokens(name))
    return bool(wanted) and all(token in have for token in wanted)


def topic_matches(topic: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(topic, pattern) for pattern in patterns)


def packing(gpu_count: int, free_gpus: int, slots_free: int, gpu_worker: bool) -> tuple[int, int, int]:
    """How good a worker that fits a task is for it, warm models aside (lower is better): GPU machines
    are kept for GPU work, GPU tasks packed tightly, other tasks spread by free slots."""
    return (int(gpu_count == 0 and gpu_worker), free_gpus - gpu_count if gpu_count else 0, -slots_free)


def usable_gpus(req: Request, view: WorkerView) -> tuple[int, ...]:
    """The worker's GPUs of the model and memory ``req`` asks for, free or not, lowest index first."""
    return tuple(
        sorted(
            g["index"]
            for g in view.gpus
            if gpu_matches(req.gpu_type, g.get("name", "")) and g.get("memory_bytes", 0) >= req.gpu_mem
        )
    )


def gpus_for(req: Request, view: WorkerView, pool: set[int]) -> list[int] | None:
    """The GPUs ``req`` would get among ``pool`` (lowest index first), or None if too few fit."""
    usable = [g for g in usable_gpus(req, view) if g in pool]
    return usable[: req.gpu_count] if len(usable) >= req.gpu_count else None


def _missing_capabilities(req: Request, view: WorkerView) -> list[tuple[str, str, list[str]]]:
    """(capability, value, what the worker has) for each capability ``req`` needs that it lacks."""
    offered = view.capabilities.get(req.task_type, {})
    return [
        (capability, value, offered.get(capability, []))
        for capability, value in req.needs
        if value not in offered.get(capability, [])
    ]


def _any_value_fix(capability: str, value: str) -> str | None:
    if capability == "harness_tasks":
        return f"cache the data of harness task {value!r}: {harness_data_fix(value)}"
    fix = CAPABILITY_FIX.get((capability, "*"))
    return fix.format(value=value) if fix else None


def _missing_tags(req: Request, view: WorkerView) -> list[str]:
    return [t for t in req.tags if t not in view.tags]


# The rules come twice: :func:`misfits` names every one that fails, for a person; the scheduler asks
# :func:`fits_registration` once per request shape and registration, then :func:`fits_now` per
# decision. Both use the helpers above, and tests/unit/test_placement.py checks that they agree.


def fits_registration(req: Request, view: WorkerView) -> bool:
    """Whether ``view`` could ever take ``req``, by what it stated at registration (topics, task
    types, capabilities, tags, CPU, memory and GPUs in all): :func:`misfits` with ``when_idle``,
    but for the worker's status, which changes without a new registration."""
    if not topic_matches(req.topic, view.topics) or req.task_type not in view.task_types:
        return False
    if _missing_capabilities(req, view) or _missing_tags(req, view):
        return False
    if req.cpu > view.cpu_total or req.mem > view.mem_total:
        return False
    return not req.gpu_count or len(usable_gpus(req, view)) >= req.gpu_count


def fits_now(req: Request, view: WorkerView, usable: tuple[int, ...] | None) -> list[int] | None:
    """The GPUs ``req`` would get on ``view`` now, or None if it does not fit: the part of
    :func:`misfits` that changes between snapshots, for a worker whose registration fits
    (``usable``: :func:`usable_gpus`; None when :func:`fits_registration` says no)."""
    if (
        usable is None
        or view.status != WorkerStatus.ACTIVE
        or req.cpu > view.cpu_free
        or req.mem > view.mem_free
        or view.slots_free < 1
    ):
        return None
    if not req.gpu_count:
        return []
    gpus = [g for g in usable if g in view.free_gpus][: req.gpu_count]
    return gpus if len(gpus) == req.gpu_count else None


@dataclass(frozen=True)
class Misfit:
    """One reason a worker cannot take a request.

    ``many`` and ``one`` say what failed, for "N workers ..." and for one worker; workers with the same
    ``many`` are counted together. ``detail`` is this worker's figures."""

    kind: str
    many: str
    one: str
    detail: str = ""
    fix: str | None = None

    def __str__(self) -> str:
        return f"{self.one} ({self.detail})" if self.detail else self.one


def _both(kind: str, verb_many: str, verb_one: str, rest: str, detail: str = "", fix: str | None = None) -> Misfit:
    return Misfit(kind, f"{verb_many} {rest}", f"{verb_one} {rest}", detail, fix)


def misfits(req: Request, view: WorkerView, *, when_idle: bool = False) -> Iterator[Misfit]:
    """Every reason ``view`` cannot take ``req`` now (or, with ``when_idle``, ever)."""
    if view.status != WorkerStatus.ACTIVE:
        yield _both("status", "are", "is", str(view.status))
        return
    if not topic_matches(req.topic, view.topics):
        takes = f"takes {', '.join(view.topics)}"
        yield _both("topic", "do not", "does not", f"take topic {req.topic!r}", takes)
    if req.task_type not in view.task_types:
        yield _both(
            "executor", "have", "has", f"no executor for {req.task_type!r}", fix=EXECUTOR_FIX.get(req.task_type)
        )
    else:
        for capability, value, have in _missing_capabilities(req, view):
            what = f"no {value} {CAPABILITY_WORDS.get(capability, capability)}"
            fix = CAPABILITY_FIX.get((capability, value)) or _any_value_fix(capability, value)
            yield _both("capability", "have", "has", what, f"has {', '.join(have) or 'none'}", fix)
    missing = _missing_tags(req, view)
    if missing:
        folded = {tag.lower(): tag for tag in view.tags}
        near = [f"{folded[tag.lower()]!r}" for tag in missing if tag.lower() in folded]
        detail = f"has {', '.join(near)}: tags are case-sensitive" if near else ""
        fix = f"start a worker with WORKER_TAGS={','.join(req.tags)}, or drop {', '.join(missing)} from resources.tags"
        yield _both("tags", "lack", "lacks", f"tag(s) {', '.join(missing)}", detail, fix)
    cpu = view.cpu_total if when_idle else view.cpu_free
    mem = view.mem_total if when_idle else view.mem_free
    scope = "in all" if when_idle else "free"
    if req.cpu > cpu:
        figures = f"{format_cpu(max(cpu, 0))} of {format_cpu(req.cpu)}"
        yield _both("cpu", "have", "has", f"too little CPU {scope}", figures)
    if req.mem > mem:
        figures = f"{readable_memory(max(mem, 0))} of {readable_memory(req.mem)}"
        yield _both("memory", "have", "has", f"too little memory {scope}", figures)
    if req.gpu_count:
        pool = {g["index"] for g in view.gpus} if when_idle else view.free_gpus
        if gpus_for(req, view, pool) is None:
            kinds = ", ".join(sorted({g.get("name", "?") for g in view.gpus})) or "no GPU"
            which = f"{req.gpu_type} " if req.gpu_type.lower() != "any" else ""
            counted = "GPU(s) in all" if when_idle else "free GPU(s)"
            figures = f"{len(pool)} {counted} ({kinds}), needs {req.gpu_count} {which}GPU(s)"
            if req.gpu_mem:
                # An estimate is seldom a whole number of units: shown in GiB, to a tenth.
                whole = req.gpu_mem % (1 << 30) == 0
                shown = format_memory(req.gpu_mem) if whole else f"{req.gpu_mem / (1 << 30):.1f}Gi"
                figures += f" of {shown} or more"
            yield _both("gpu", "have", "has", f"too few {'GPUs in all' if when_idle else 'free GPUs'}", figures)
    if not when_idle and view.slots_free < 1:
        yield Misfit(
            "slots", "are running their maximum of tasks", f"is running its maximum of {view.slots_total} task(s)"
        )


def misfit(req: Request, view: WorkerView, *, when_idle: bool = False) -> str | None:
    """The first reason ``view`` cannot take ``req`` (see :func:`misfits`), or None if it can."""
    first = next(misfits(req, view, when_idle=when_idle), None)
    return None if first is None else str(first)


def _summary(req: Request, views: list[WorkerView], *, when_idle: bool) -> tuple[str, list[str]]:
    """'0/3 workers fit: 2 have ... (w1: ..., w2: ...); 1 has ...' and the fixes that apply."""
    groups: dict[tuple[str, str], list[tuple[str, Misfit]]] = {}
    fitting = 0
    # In id order, so a reason told twice (each pass, each `--wait` poll) reads the same.
    for view in sorted(views, key=lambda v: v.worker_id):
        found = list(misfits(req, view, when_idle=when_idle))
        fitting += not found
        for item in found:
            groups.setdefault((item.kind, item.many), []).append((view.worker_id, item))
    parts = []
    for members in sorted(groups.values(), key=lambda members: (-len(members), members[0][0])):
        first = members[0][1]
        phrase = first.many if len(members) > 1 else first.one
        shown = [f"{w}: {m.detail}" if m.detail else w for w, m in members[:SHOWN_PER_GROUP]]
        more = f", {len(members) - SHOWN_PER_GROUP} more" if len(members) > SHOWN_PER_GROUP else ""
        parts.append(f"{len(members)} {phrase} ({', '.join(shown)}{more})")
    fixes: list[str] = []
    live = [v for v in views if v.status == WorkerStatus.ACTIVE]
    if live and not any(topic_matches(req.topic, v.topics) for v in live):
        fixes.append(f"topic {req.topic} is taken by no worker: start one with TASK_TOPICS={req.topic} (or tasks.*)")
    for members in groups.values():
        fix = members[0][1].fix
        if fix and len(members) == len(live) and fix not in fixes:
            fixes.append(f"to fix: {fix}")
    noun = "worker" if len(views) == 1 else "workers"
    return f"{fitting}/{len(views)} {noun} fit: " + "; ".join(parts), fixes


def explain(req: Request, views: list[WorkerView]) -> tuple[str, bool]:
    """A person-readable reason the task waits, naming everything that does not fit across the
    fleet, and whether no registered worker could ever run it."""
    live = [v for v in views if v.status == WorkerStatus.ACTIVE]
    if not live:
        draining = sorted(v.worker_id for v in views if v.status == WorkerStatus.DRAINING)
        if draining:
            shown = ", ".join(draining[:SHOWN_PER_GROUP]) + (", ..." if len(draining) > SHOWN_PER_GROUP else "")
            return (
                f"no worker takes new tasks: {len(draining)} draining ({shown}); one that was cordoned takes "
                "them again after `mloc workers uncordon ID`, or start another worker",
                False,
            )
        return "no worker is registered; start one with `mloc start --node-type worker`", True
    never = not any(fits_registration(req, v) for v in live)
    if never:
        # A cordon is for a while: a task only a cordoned (draining) worker could run waits for it.
        paused = sorted(v.worker_id for v in views if v.status == WorkerStatus.DRAINING and fits_registration(req, v))
        if paused:
            shown = ", ".join(paused[:SHOWN_PER_GROUP]) + (", ..." if len(paused) > SHOWN_PER_GROUP else "")
            return (
                f"waiting: only draining workers could run this task ({shown}); one that was cordoned takes it "
                f"after `mloc workers uncordon {paused[0]}`, or start another worker like it",
                False,
            )
    summary, fixes = _summary(req, views, when_idle=never)
    text = "; ".join([summary, *fixes])
    if never:
        return f"no registered worker can run this task: {text}", True
    return f"waiting for capacity: {text}", False


class WaitCode(StrEnum):
    """Why a waiting task cannot start however much room the fleet has (its ``pending_code``, written
    with its pending reason): a worker more would not start it, so autoscaling demand leaves it out
    (:mod:`.demand`), and its start estimate says what it waits for (:mod:`.eta`)."""

    QUOTA = "quota"  # its owner is at a quota limit, or it needs more GPUs than the quota allows at all
    BUDGET = "budget"  # an exhausted budget of its owner covers it: it waits for the reset or a raise
