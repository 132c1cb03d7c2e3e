"""Placement rules: GPU model matching, fit, scoring and the reasons a task waits."""

from __future__ import annotations

import pytest

from mloc.orchestrator.placement import Request, explain, gpu_matches, misfit
from mloc.orchestrator.scheduler import _score
from mloc.records import WorkerStatus, WorkerView


def view(
    worker_id: str = "w1",
    *,
    gpus: list[str] | None = None,
    free: set[int] | None = None,
    topics: list[str] | None = None,
    tags: set[str] | None = None,
    cpu: int = 8000,
    mem: int = 64 << 30,
    slots: int = 4,
    warm: set[str] | None = None,
    held: set[str] | None = None,
    types: set[str] | None = None,
    caps: dict | None = None,
) -> WorkerView:
    gpu_list = [{"index": i, "name": name, "memory_bytes": 80 << 30} for i, name in enumerate(gpus or [])]
    return WorkerView(
        worker_id=worker_id,
        status=WorkerStatus.ACTIVE,
        last_heartbeat=0.0,
        topics=topics or ["tasks.*"],
        tags=tags or set(),
        task_types=types or {"inference", "sft", "echo"},
        capabilities=caps or {},
        gpus=gpu_list,
        cpu_total=cpu,
        mem_total=mem,
        slots_total=slots,
        cpu_free=cpu,
        mem_free=mem,
        slots_free=slots,
        free_gpus=set(range(len(gpu_list))) if free is None else free,
        warm_models=warm or set(),
        held_models=held or set(),
    )


@pytest.mark.parametrize(
    ("wanted", "name", "ok"),
    [
        ("any", "NVIDIA H100 80GB HBM3", True),
        ("A100", "NVIDIA A100-SXM4-80GB", True),
        ("a100", "NVIDIA A100-SXM4-80GB", True),
        ("A100-80GB", "NVIDIA A100-SXM4-80GB", True),
        ("A100-40GB", "NVIDIA A100-SXM4-80GB", False),
        ("H100", "NVIDIA A100-SXM4-80GB", False),
        ("rtx 4090", "NVIDIA GeForce RTX 4090", True),
        ("L4", "NVIDIA L40S", False),
        ("L40S", "NVIDIA L40S", True),
    ],
)
def test_gpu_model_matching(wanted: str, name: str, ok: bool) -> None:
    assert gpu_matches(wanted, name) is ok


def test_gpu_count_and_model_must_fit() -> None:
    req = Request(task_type="inference", topic="tasks.inference", gpu_count=2, gpu_type="A100")
    assert misfit(req, view(gpus=["NVIDIA A100-SXM4-80GB"] * 2)) is None
    assert "needs 2 A100 GPU(s)" in (misfit(req, view(gpus=["NVIDIA A100-SXM4-80GB"])) or "")
    assert misfit(req, view(gpus=["NVIDIA H100 80GB HBM3"] * 4)) is not None
    busy = view(gpus=["NVIDIA A100-SXM4-80GB"] * 2, free={1})
    assert "free GPU" in (misfit(req, busy) or "")
    assert misfit(req, busy, when_idle=True) is None


def test_topics_tags_task_types_and_engines() -> None:
    req = Request(task_type="sft", topic="tasks.sft", tags=("a100-pool",))
    assert "topic" in (misfit(req, view(topics=["tasks.inference"])) or "")
    assert "lacks tag" in (misfit(req, view()) or "")
    assert misfit(req, view(tags={"a100-pool", "eu"})) is None
    assert "no executor" in (misfit(req, view(tags={"a100-pool"}, types={"inference"})) or "")
    vllm = Request(task_type="inference", topic="tasks.inference", needs=(("engines", "vllm"),))
    assert "no vllm engine" in (misfit(vllm, view(caps={"inference": {"engines": ["transformers"]}})) or "")
    assert misfit(vllm, view(caps={"inference": {"engines": ["transformers", "vllm"]}})) is None


def test_cpu_memory_and_slots() -> None:
    req = Request(task_type="echo", topic="tasks.echo", cpu=4000, mem=16 << 30)
    assert misfit(req, view(cpu=2000)) == "has too little CPU free (2 of 4)"
    assert "memory" in (misfit(req, view(mem=8 << 30)) or "")
    full = view()
    full.slots_free = 0
    assert "maximum of 4" in (misfit(req, full) or "")


def test_scoring_prefers_warm_model_then_keeps_gpus_for_gpu_work() -> None:
    req = Request(task_type="inference", topic="tasks.inference", model="gemma3-270m")
    cold, warm = view("cold"), view("warm", warm={"transformers:gemma3-270m"})
    assert sorted([cold, warm], key=lambda v: _score(req, v))[0].worker_id == "warm"
    # Next: a worker whose disk holds the files (no download), then one that must fetch them.
    hub = Request(task_type="inference", topic="tasks.inference", model="org/model")
    cold, held = view("cold", slots=8), view("held", held={"org/model"})
    loaded = view("loaded", held={"org/model"}, warm={"vllm:org/model"})
    assert [v.worker_id for v in sorted([cold, held, loaded], key=lambda v: _score(hub, v))] == [
        "loaded",
        "held",
        "cold",
    ]
    cpu_req = Request(task_type="echo", topic="tasks.echo")
    gpu_box, cpu_box = view("gpu", gpus=["NVIDIA L4"]), view("cpu")
    assert sorted([gpu_box, cpu_box], key=lambda v: _score(cpu_req, v))[0].worker_id == "cpu"
    gpu_req = Request(task_type="inference", topic="tasks.inference", gpu_count=1)
    big, small = view("big", gpus=["NVIDIA L4"] * 8), view("small", gpus=["NVIDIA L4"])
    assert sorted([big, small], key=lambda v: _score(gpu_req, v))[0].worker_id == "small"


def test_explain_distinguishes_waiting_from_never() -> None:
    req = Request(task_type="inference", topic="tasks.inference", gpu_count=4)
    reason, never = explain(req, [view(gpus=["NVIDIA L4"] * 2)])
    assert never and reason.startswith("no registered worker can run this task")
    busy = view(gpus=["NVIDIA L4"] * 4, free={0})
    reason, never = explain(req, [busy])
    assert not never and reason.startswith("waiting for capacity")
    reason, never = explain(req, [])
    assert never and "no worker is registered" in reason


def test_agent_tools_a_worker_must_switch_on() -> None:
    from mloc.orchestrator.placement import request_of
    from mloc.spec import load

    doc = load(
        "taskType: agent_inference\ninput: hi\nhyperparameters: {tools: [python_repl, retriever], retriever_collection: docs}\n"
    )
    req = request_of(doc)
    assert req.needs == (("agent_tools", "python_repl"),)
    plain = view(types={"agent_inference"}, caps={"agent_inference": {"agent_tools": ["retriever"]}})
    assert "has no python_repl agent tool" in (misfit(req, plain) or "")
    allowed = view(types={"agent_inference"}, caps={"agent_inference": {"agent_tools": ["retriever", "python_repl"]}})
    assert misfit(req, allowed) is None
    assert Request.from_json(req.to_json()) == req


def busy_view(worker_id: str, **kwargs: object) -> WorkerView:
    """A worker whose capacity is all taken."""
    base = view(worker_id, **kwargs)  # type: ignore[arg-type]
    base.cpu_free, base.slots_free, base.free_gpus = 0, 0, set()
    return base


def test_pending_reason_names_every_misfit_across_the_fleet() -> None:
    req = Request(task_type="sft", topic="tasks.sft", cpu=8000, gpu_count=1)
    fleet = [
        busy_view("gpu-1", gpus=["NVIDIA L4"]),
        busy_view("gpu-2", gpus=["NVIDIA L4"]),
        view("cpu-1", cpu=2000),
    ]
    reason, never = explain(req, fleet)
    assert not never
    assert reason.startswith("waiting for capacity: 0/3 workers fit: ")
    # Workers failing the same check are counted together, and every check that fails is named, not
    # just the first one.
    assert "3 have too little CPU free (cpu-1: 2 of 8, gpu-1: 0 of 8, gpu-2: 0 of 8)" in reason
    assert (
        "3 have too few free GPUs (cpu-1: 0 free GPU(s) (no GPU), needs 1 GPU(s), gpu-1: 0 free GPU(s) "
        "(NVIDIA L4), needs 1 GPU(s), gpu-2: 0 free GPU(s) (NVIDIA L4), needs 1 GPU(s))"
    ) in reason
    assert "2 are running their maximum of tasks (gpu-1, gpu-2)" in reason
    # One worker alone reads in the singular; one that could never take it counts what it has in all.
    reason, never = explain(req, [view("cpu-1", cpu=2000)])
    assert never and "0/1 worker fit: 1 has too little CPU in all (cpu-1: 2 of 8); 1 has too few GPUs in all" in reason


def test_a_topic_no_worker_takes_names_the_fix() -> None:
    req = Request(task_type="sft", topic="tasks.sft")
    reason, never = explain(req, [view("w1", topics=["tasks.inference"]), view("w2", topics=["tasks.inference"])])
    assert never
    assert (
        "0/2 workers fit: 2 do not take topic 'tasks.sft' (w1: takes tasks.inference, w2: takes tasks.inference)"
        in reason
    )
    assert "topic tasks.sft is taken by no worker: start one with TASK_TOPICS=tasks.sft (or tasks.*)" in reason


def test_a_missing_executor_names_the_extra_to_install() -> None:
    req = Request(task_type="sft", topic="tasks.sft")
    reason, never = explain(req, [view("w1", types={"inference", "echo"})])
    assert never
    assert "0/1 worker fit: 1 has no executor for 'sft' (w1)" in reason
    assert "to fix: pip install 'mloc[train]' on the worker" in reason
    # When another worker has it, the task only waits, and no install is suggested.
    reason, never = explain(req, [view("w1", types={"inference"}), busy_view("w2")])
    assert not never and "pip install" not in reason
