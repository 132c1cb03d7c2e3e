"""The fit rules of mloc.orchestrator.placement, one by one, and the scheduler's fast path held
against the explaining one over generated workers and requests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mloc.orchestrator.placement import (
    Request,
    explain,
    fits_now,
    fits_registration,
    gpu_matches,
    gpus_for,
    misfit,
    misfits,
    request_of,
    usable_gpus,
)
from mloc.records import WorkerStatus, WorkerView
from mloc.spec import load

L4, A100, H100 = "NVIDIA L4", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def view(
    worker_id: str = "w1",
    *,
    status: WorkerStatus = WorkerStatus.ACTIVE,
    gpus: list[tuple[str, int]] | None = None,
    free: set[int] | None = None,
    topics: list[str] | None = None,
    tags: set[str] | None = None,
    types: set[str] | None = None,
    caps: dict[str, Any] | None = None,
    cpu: int = 8000,
    mem: int = 64 << 30,
    slots: int = 4,
    cpu_free: int | None = None,
    mem_free: int | None = None,
    slots_free: int | None = None,
) -> WorkerView:
    """A worker with ``gpus`` as (model, memory) pairs, all of its capacity free unless told otherwise."""
    gpu_list = [{"index": i, "name": name, "memory_bytes": memory} for i, (name, memory) in enumerate(gpus or [])]
    return WorkerView(
        worker_id=worker_id,
        status=status,
        last_heartbeat=0.0,
        topics=topics if topics is not None else ["tasks.*"],
        tags=tags or set(),
        task_types=types if types is not None else {"echo", "inference", "sft"},
        capabilities=caps or {},
        gpus=gpu_list,
        cpu_total=cpu,
        mem_total=mem,
        slots_total=slots,
        cpu_free=cpu if cpu_free is None else cpu_free,
        mem_free=mem if mem_free is None else mem_free,
        slots_free=slots if slots_free is None else slots_free,
        free_gpus=set(range(len(gpu_list))) if free is None else free,
    )


def echo(**kwargs: Any) -> Request:
    return Request(task_type=kwargs.pop("task_type", "echo"), topic=kwargs.pop("topic", "tasks.echo"), **kwargs)


def kinds(req: Request, worker: WorkerView, *, when_idle: bool = False) -> list[str]:
    return [m.kind for m in misfits(req, worker, when_idle=when_idle)]


# ------------------------------------------------------------------------------ one rule at a time
def test_a_worker_that_is_not_active_takes_nothing_and_says_its_status() -> None:
    for status in (WorkerStatus.DRAINING, WorkerStatus.LOST, WorkerStatus.OFFLINE, WorkerStatus.UNRESPONSIVE):
        assert misfit(echo(), view(status=status)) == f"is {status}"
        assert fits_now(echo(), view(status=status), ()) is None
    assert misfit(echo(), view()) is None


def test_topic_must_match_one_of_the_worker_patterns() -> None:
    assert kinds(echo(topic="tasks.echo"), view(topics=["tasks.*"])) == []
    assert kinds(echo(topic="tasks.echo"), view(topics=["tasks.inference", "tasks.echo"])) == []
    assert misfit(echo(topic="tasks.echo"), view(topics=["tasks.inference"])) == (
        "does not take topic 'tasks.echo' (takes tasks.inference)"
    )
    assert not fits_registration(echo(topic="batch.echo"), view(topics=["tasks.*"]))


def test_task_type_needs_an_executor_on_the_worker_and_names_the_fix() -> None:
    req = echo(task_type="sft", topic="tasks.sft")
    found = list(misfits(req, view(types={"echo"})))
    assert [m.kind for m in found] == ["executor"]
    assert str(found[0]) == "has no executor for 'sft'"
    assert found[0].fix == "pip install 'mloc[train]' on the worker ('mloc[train,qlora]' for QLoRA)"
    assert not fits_registration(req, view(types={"echo"}))
    assert fits_registration(req, view(types={"sft"}))


def test_capabilities_an_executor_must_advertise() -> None:
    vllm = echo(task_type="inference", topic="tasks.inference", needs=(("engines", "vllm"),))
    transformers_only = view(caps={"inference": {"engines": ["transformers"]}})
    assert misfit(vllm, transformers_only) == "has no vllm engine (has transformers)"
    assert misfit(vllm, view()) == "has no vllm engine (has none)"
    assert misfit(vllm, view(caps={"inference": {"engines": ["transformers", "vllm"]}})) is None
    assert not fits_registration(vllm, transformers_only)


def test_gated_agent_tools_are_needs() -> None:
    doc = load(
        "taskType: agent_inference\ninput: hi\n"
        "hyperparameters: {tools: [python_repl, retriever], retriever_collection: docs}\n"
    )
    req = request_of(doc)
    assert req.needs == (("agent_tools", "python_repl"),)
    plain = view(types={"agent_inference"}, caps={"agent_inference": {"agent_tools": ["retriever"]}})
    assert misfit(req, plain) == "has no python_repl agent tool (has retriever)"
    on = view(types={"agent_inference"}, caps={"agent_inference": {"agent_tools": ["retriever", "python_repl"]}})
    assert misfit(req, on) is None


def test_every_requested_tag_must_be_on_the_worker() -> None:
    req = echo(tags=("a100-pool", "eu"))
    assert misfit(req, view(tags={"a100-pool"})) == "lacks tag(s) eu"
    assert misfit(req, view(tags={"a100-pool", "eu", "spot"})) is None
    assert not fits_registration(req, view(tags={"eu"}))
    assert misfit(req, view(tags={"a100-pool", "EU"})) == "lacks tag(s) eu (has 'EU': tags are case-sensitive)"


def test_a_tag_no_worker_carries_names_the_fix() -> None:
    reason, never = explain(echo(tags=("gamma",)), [view("w1", tags={"alpha"}), view("w2", tags={"beta"})])
    assert never and "2 lack tag(s) gamma" in reason
    assert "to fix: start a worker with WORKER_TAGS=gamma, or drop gamma from resources.tags" in reason


def test_cpu_free_now_and_in_all() -> None:
    req = echo(cpu=4000)
    assert misfit(req, view(cpu=8000, cpu_free=2000)) == "has too little CPU free (2 of 4)"
    assert misfit(req, view(cpu=8000, cpu_free=2000), when_idle=True) is None
    assert misfit(req, view(cpu=2000), when_idle=True) == "has too little CPU in all (2 of 4)"
    assert not fits_registration(req, view(cpu=2000))
    assert fits_now(req, view(cpu=8000, cpu_free=3999), ()) is None
    assert fits_now(req, view(cpu=8000, cpu_free=4000), ()) == []


def test_memory_free_now_and_in_all() -> None:
    req = echo(mem=16 << 30)
    assert "too little memory free" in (misfit(req, view(mem_free=8 << 30)) or "")
    assert "too little memory in all" in (misfit(req, view(mem=8 << 30), when_idle=True) or "")
    assert not fits_registration(req, view(mem=8 << 30))
    assert fits_now(req, view(mem_free=16 << 30), ()) == []


def test_a_worker_at_its_slot_limit_takes_nothing_until_one_ends() -> None:
    assert misfit(echo(), view(slots=2, slots_free=0)) == "is running its maximum of 2 task(s)"
    assert misfit(echo(), view(slots=2, slots_free=0), when_idle=True) is None
    assert fits_now(echo(), view(slots_free=0), ()) is None


@pytest.mark.parametrize(
    ("wanted", "name", "ok"),
    [
        ("any", H100, True),
        ("A100", A100, True),
        ("a100", A100, True),
        ("A100-80GB", A100, True),
        ("A100-40GB", A100, False),
        ("H100", A100, False),
        ("L4", "NVIDIA L40S", False),
        ("L40S", "NVIDIA L40S", True),
    ],
)
def test_gpu_type_matches_by_name_tokens(wanted: str, name: str, ok: bool) -> None:
    req = echo(gpu_count=1, gpu_type=wanted)
    assert (misfit(req, view(gpus=[(name, 80 << 30)])) is None) is ok


def test_gpu_count_type_and_memory() -> None:
    req = echo(gpu_count=2, gpu_type="A100", gpu_mem=40 << 30)
    two = view(gpus=[(A100, 80 << 30), (A100, 80 << 30)])
    assert misfit(req, two) is None
    assert fits_now(req, two, usable_gpus(req, two)) == [0, 1]
    assert misfit(req, view(gpus=[(A100, 80 << 30)])) == (
        "has too few free GPUs (1 free GPU(s) (NVIDIA A100-SXM4-80GB), needs 2 A100 GPU(s) of 40Gi or more)"
    )
    small = view(gpus=[(A100, 20 << 30), (A100, 20 << 30)])
    assert misfit(req, small) is not None and not fits_registration(req, small)
    mixed = view(gpus=[(L4, 24 << 30), (A100, 80 << 30), (H100, 80 << 30), (A100, 80 << 30)])
    assert usable_gpus(req, mixed) == (1, 3)
    assert gpus_for(req, mixed, {0, 1, 2, 3}) == [1, 3]


def test_gpus_taken_now_wait_but_fit_when_idle() -> None:
    req = echo(gpu_count=2)
    busy = view(gpus=[(L4, 1), (L4, 1), (L4, 1)], free={2})
    assert "too few free GPUs" in (misfit(req, busy) or "")
    assert misfit(req, busy, when_idle=True) is None
    assert fits_now(req, busy, usable_gpus(req, busy)) is None
    busy.free_gpus = {0, 2}
    assert fits_now(req, busy, usable_gpus(req, busy)) == [0, 2]


def test_every_failing_rule_is_named_not_only_the_first() -> None:
    req = echo(topic="tasks.echo", tags=("eu",), cpu=9000, gpu_count=1)
    assert kinds(req, view(topics=["tasks.sft"], cpu=8000)) == ["topic", "tags", "cpu", "gpu"]


def test_explain_sums_up_the_fleet_and_separates_waiting_from_never() -> None:
    req = echo(gpu_count=4)
    reason, never = explain(req, [view("w1", gpus=[(L4, 1)] * 2), view("w2", gpus=[(L4, 1)] * 2)])
    assert never and reason.startswith("no registered worker can run this task: 0/2 workers fit: 2 have too few")
    reason, never = explain(req, [view("w1", gpus=[(L4, 1)] * 4, free={0})])
    assert not never and reason.startswith("waiting for capacity: 0/1 worker fit: 1 has too few free GPUs")
    assert explain(req, []) == ("no worker is registered; start one with `mloc start --node-type worker`", True)
    assert explain(req, [view(status=WorkerStatus.LOST)])[1]


def test_explain_names_the_fix_when_no_worker_could_ever_take_it() -> None:
    reason, never = explain(echo(topic="batch.echo"), [view(topics=["tasks.*"])])
    assert never and "topic batch.echo is taken by no worker: start one with TASK_TOPICS=batch.echo" in reason
    reason, never = explain(echo(task_type="dpo", topic="tasks.dpo"), [view(types={"echo"})])
    assert never and "to fix: pip install 'mloc[train]' on the worker" in reason


def test_a_task_only_a_cordoned_worker_could_run_waits_for_it_and_says_how_to_uncordon() -> None:
    cordoned = view("w-alpha", tags={"alpha"}, status=WorkerStatus.DRAINING)
    reason, never = explain(echo(tags=("alpha",)), [cordoned, view("w-beta", tags={"beta"})])
    assert not never
    assert reason == (
        "waiting: only draining workers could run this task (w-alpha); one that was cordoned takes it after "
        "`mloc workers uncordon w-alpha`, or start another worker like it"
    )
    # With no draining worker that could, it stays a task no worker can ever run.
    assert explain(echo(tags=("gamma",)), [cordoned, view("w-beta", tags={"beta"})])[1]


def test_a_reason_names_the_workers_in_the_same_order_whatever_order_they_were_read_in() -> None:
    fleet = [view(f"w{i}", tags={f"t{i}"}, topics=["tasks.sft"] if i % 2 else ["tasks.*"]) for i in range(6)]
    reasons = {explain(echo(tags=("gamma",)), order)[0] for order in (fleet, fleet[::-1], fleet[3:] + fleet[:3])}
    assert len(reasons) == 1, reasons


# ------------------------------------------------------------------- the fast path agrees, always
BREAKS = [
    None,
    "status",
    "topic",
    "task_type",
    "capability",
    "tag",
    "cpu_free",
    "cpu_total",
    "mem_free",
    "mem_total",
    "slots",
    "gpus_free",
    "gpus_total",
    "gpu_type",
    "gpu_memory",
]


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Request, WorkerView, str | None]:
    """A worker, a request that its registration fits, and then at most one rule broken on purpose,
    so that every rule is met both ways, most often on its edge."""
    model = draw(st.sampled_from([L4, A100, H100]))
    names = [draw(st.sampled_from([model, model, L4])) for _ in range(draw(st.integers(0, 4)))]
    slots = draw(st.integers(1, 3))
    worker = view(
        gpus=[(name, 3) for name in names],
        free=draw(st.sets(st.sampled_from(range(len(names))))) if names else set(),
        topics=draw(st.sampled_from([["tasks.*"], ["tasks.echo", "batch.*"]])),
        tags={"eu", "spot"},
        types={"echo", "inference"},
        caps={"echo": {"engines": ["vllm", "transformers"], "agent_tools": ["python_repl"]}},
        cpu=4,
        mem=4,
        slots=slots,
        cpu_free=draw(st.integers(0, 4)),
        mem_free=draw(st.integers(0, 4)),
        slots_free=draw(st.integers(0, slots)),
    )
    wanted = draw(st.sampled_from(["any", model.split()[-1]]))
    matching = [i for i, name in enumerate(names) if gpu_matches(wanted, name)]
    req = Request(
        task_type="echo",
        topic="tasks.echo",
        cpu=draw(st.integers(0, 4)),
        mem=draw(st.integers(0, 4)),
        gpu_count=draw(st.integers(0, len(matching))),
        gpu_type=wanted,
        gpu_mem=draw(st.integers(0, 3)),
        tags=tuple(draw(st.sets(st.sampled_from(["eu", "spot"])))),
        needs=tuple(draw(st.sets(st.sampled_from([("engines", "vllm"), ("agent_tools", "python_repl")])))),
    )
    broken = draw(st.sampled_from(BREAKS))
    if broken == "status":
        worker.status = draw(st.sampled_from([WorkerStatus.DRAINING, WorkerStatus.UNRESPONSIVE]))
    elif broken == "topic":
        req = replace(req, topic="other.echo")
    elif broken == "task_type":
        worker.task_types = {"inference"}
    elif broken == "capability":
        req = replace(req, needs=(*req.needs, ("engines", "sglang")))
    elif broken == "tag":
        req = replace(req, tags=(*req.tags, "us"))
    elif broken == "cpu_free":
        req = replace(req, cpu=worker.cpu_free + 1)
    elif broken == "cpu_total":
        req = replace(req, cpu=worker.cpu_total + 1)
    elif broken == "mem_free":
        req = replace(req, mem=worker.mem_free + 1)
    elif broken == "mem_total":
        req = replace(req, mem=worker.mem_total + 1)
    elif broken == "slots":
        worker.slots_free = 0
    elif broken == "gpus_free":
        req = replace(req, gpu_count=len(worker.free_gpus & set(matching)) + 1)
    elif broken == "gpus_total":
        req = replace(req, gpu_count=len(matching) + 1)
    elif broken == "gpu_type":
        req = replace(req, gpu_count=max(req.gpu_count, 1), gpu_type="B200")
    elif broken == "gpu_memory":
        req = replace(req, gpu_count=max(req.gpu_count, 1), gpu_mem=4)
    return req, worker, broken


@settings(max_examples=300, deadline=None, database=None)
@given(pairs())
def test_the_scheduler_fast_path_agrees_with_misfits(pair: tuple[Request, WorkerView, str | None]) -> None:
    """What the scheduler decides (registration once, then the free figures) is what misfits says,
    and the GPUs it picks are the ones gpus_for would; a rule broken on purpose is always seen."""
    req, worker, broken = pair
    usable = usable_gpus(req, worker) if fits_registration(req, worker) else None
    picked = fits_now(req, worker, usable)
    assert (picked is not None) == (misfit(req, worker) is None)
    if picked is not None and req.gpu_count:
        assert picked == gpus_for(req, worker, worker.free_gpus)
    ever = worker.status == WorkerStatus.ACTIVE and fits_registration(req, worker)
    assert ever == (misfit(req, worker, when_idle=True) is None)
    if broken is not None:
        assert picked is None
