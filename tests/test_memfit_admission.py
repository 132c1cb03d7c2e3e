"""Memory fit at admission, through a real orchestrator (the API app on real Redis) and workers with GPUs
of stated sizes: the estimate on the task and in the dry run, the refusal of what no registered GPU could
hold, warn mode, the user's override, placement on a GPU big enough, the facts read from a hub (a local
one speaking the Hub's file API) or published by a worker, the fallback when a config cannot be read, and
a real worker's measured peak correcting the next estimate."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from mloc import keys, memoryhistory
from mloc.api.app import create_app
from mloc.client import Client
from mloc.llm.modelfacts import facts_from_config
from mloc.localcluster import LocalCluster
from mloc.orchestrator import admission, factfinder
from mloc.records import MODEL_FACTS, Registration
from mloc.settings import Settings, describe_invalid
from mloc.workers import WorkerRegistry
from tests.support import fleet
from tests.support.cli import mloc
from tests.support.gguf_file import tiny_llama_gguf
from tests.support.hubserver import HubServer
from tests.support.tiny_model import build_tiny_causal_lm
from tests.unit.test_memfit import LLAMA3_8B, QWEN25_05B

GIB = 1 << 30
LLAMA = "meta-llama/Meta-Llama-3-8B"
QWEN = "Qwen/Qwen2.5-0.5B"
LLAMA_70B = "meta-llama/Meta-Llama-3-70B"
# Llama 3 70B's config.json differs from 8B's only in these sizes.
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
LLAMA3_70B["num_attention_heads"] = 64
L4 = "NVIDIA L4"
A100 = "NVIDIA A100-SXM4-80GB"


def gpu_worker(
    worker_id: str,
    gpu: str,
    gpu_memory: int,
    *,
    gpus: int = 1,
    memory: int = 64 * GIB,
    facts: dict[str, Any] | None = None,
) -> Registration:
    """A worker that runs inference and SFT on ``gpus`` GPUs of one model, as a GPU host would register."""
    return fleet.registration(
        worker_id,
        gpus=gpus,
        cpu=32000,
        memory=memory,
        gpu_memory=gpu_memory,
        gpu_name=gpu,
        task_types=("inference", "sft"),
        capabilities={"inference": {"engines": ["vllm", "transformers"]}},
        model_facts=facts,
    )


def eval_worker(worker_id: str, gpu: str, gpu_memory: int) -> Registration:
    """A GPU host that runs eval tasks (lm-eval on transformers), holding no harness task's data."""
    return fleet.registration(
        worker_id,
        gpus=1,
        cpu=32000,
        memory=64 * GIB,
        gpu_memory=gpu_memory,
        gpu_name=gpu,
        task_types=("eval",),
        capabilities={"eval": {"engines": ["transformers"], "harness_tasks": []}},
    )


def register(redis_url: str, *registrations: Registration) -> None:
    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            for registration in registrations:
                await WorkerRegistry(client).register(registration)
        finally:
            await client.aclose()

    asyncio.run(go())


def mloc_task(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A mloc/v1 task called ``name`` with ``spec``."""
    return {"apiVersion": "mloc/v1", "kind": "Task", "metadata": {"name": name}, "spec": spec}


def sft(model: str = LLAMA, *, gpus: int = 1, **gpu: Any) -> dict[str, Any]:
    """LoRA fine-tuning of ``model``: about 69 GiB on one GPU for Llama 3 8B at batch 4 x 2048 tokens."""
    return mloc_task(
        "tune",
        {
            "taskType": "sft",
            "model": {"source": {"identifier": model}, "adapter": {"type": "lora"}},
            "dataset": {"path": "/data/train.jsonl"},
            "hyperparameters": {"batch_size": 4, "max_length": 2048},
            "resources": {"hardware": {"gpu": {"type": "any", "count": gpus, **gpu}}},
        },
    )


def serve(model: str = QWEN, **extra: Any) -> dict[str, Any]:
    """vLLM inference on one GPU: about 3 GiB for Qwen 2.5 0.5B."""
    return mloc_task(
        "serve",
        {
            "taskType": "inference",
            "model": {"source": {"identifier": model}, "engine": "vllm"},
            "inference": {"prompts": ["Say hello."] * 4, "max_tokens": 32},
            "resources": {"hardware": {"gpu": {"count": 1}}},
            **extra,
        },
    )


def evaluate(model: str = QWEN, **options: Any) -> dict[str, Any]:
    """An lm-eval run of a multiple-choice file on one GPU: about 3.9 GiB for Qwen 2.5 0.5B at batch 8."""
    return mloc_task(
        "score",
        {
            "taskType": "eval",
            "model": {"source": {"identifier": model}},
            "eval": {"custom": [{"name": "mc", "path": "/data/mc.jsonl", "type": "multiple_choice"}], **options},
            "resources": {"hardware": {"gpu": {"count": 1}}},
        },
    )


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.hub.add_repo(LLAMA, {"config.json": json.dumps(LLAMA3_8B).encode()})
        server.hub.add_repo(QWEN, {"config.json": json.dumps(QWEN25_05B).encode()})
        server.hub.add_repo(LLAMA_70B, {"config.json": json.dumps(LLAMA3_70B).encode()})
        broken = {key: value for key, value in LLAMA3_8B.items() if key != "num_hidden_layers"}
        server.hub.add_repo("org/broken", {"config.json": json.dumps(broken).encode()})
        yield server


@pytest.fixture
def orchestrator(redis_url: str) -> Iterator[Callable[..., TestClient]]:
    """The API app on the test Redis, started in this process (``env``: settings to add)."""
    with ExitStack() as stack:

        def start(hub: HubServer | None = None, **env: str) -> TestClient:
            values = {"MLOC_REDIS_URL": redis_url, "HEARTBEAT_TTL_SEC": "60", "MLOC_SCHEDULE_INTERVAL_SEC": "0.2"}
            if hub is not None:
                values |= {"HF_ENDPOINT": hub.url, "MLOC_OFFLINE": "0"}
            return stack.enter_context(TestClient(create_app(Settings.model_validate({**values, **env}))))

        yield start


def submitted(http: TestClient, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The submit answer and the task's record as GET shows it."""
    response = http.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    answer = response.json()
    return answer, http.get(f"/api/v1/tasks/{answer['task_id']}").json()


# ---------------------------------------------------------------------------------------- refusal


def test_a_gpu_task_no_registered_gpu_can_hold_is_refused_with_the_numbers(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub)
    response = http.post("/api/v1/tasks", json=sft())
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "does_not_fit"
    assert body["message"].startswith("needs about 69.3 GiB on one GPU: weights 15.0, ")
    assert "activations 53.7" in body["message"]
    assert "; the largest GPU registered has 24 GiB. To run it: " in body["message"]
    assert "resources.hardware.gpu.memory" in body["message"] and "MLOC_MEMFIT=warn" in body["message"]
    assert body["details"][0]["path"] == "spec.resources.hardware.gpu"
    # A bulk submit is refused whole, naming the task that does not fit.
    bulk = http.post("/api/v1/tasks/bulk", json=[serve(), sft()])
    assert bulk.status_code == 422 and bulk.json()["message"].startswith("task 1: needs about 69.3 GiB")
    assert http.get("/api/v1/tasks").json()["total"] == 0  # nothing stored


def test_an_eval_no_registered_gpu_can_hold_is_refused_at_submit(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, eval_worker("l4", L4, 24 * GIB), eval_worker("a100", A100, 80 * GIB))
    http = orchestrator(hub)
    response = http.post("/api/v1/tasks", json=evaluate(LLAMA_70B))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "does_not_fit"
    assert body["message"].startswith("needs about 136.1 GiB on one GPU: weights 131.4, ")
    assert "; the largest GPU registered has 80 GiB. To run it: " in body["message"]
    assert "eval.batch_size" in body["message"] and "resources.hardware.gpu.memory" in body["message"]
    assert body["details"][0]["path"] == "spec.resources.hardware.gpu"
    assert http.get("/api/v1/tasks").json()["total"] == 0  # nothing stored


def test_an_eval_that_fits_carries_its_estimate_and_is_placed_by_it(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, eval_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub)
    dry = http.post("/api/v1/tasks?dry_run=true", json=evaluate()).json()
    assert dry["would_place_on"] == ["l4"]
    answer, record = submitted(http, evaluate())
    assert answer["worker_id"] == "l4" and "memory_warning" not in answer
    estimate = record["memory_estimate"]
    assert estimate == dry["memory_estimate"]
    assert (estimate["task"], estimate["kind"], estimate["model_key"]) == (
        "eval on transformers",
        "eval on transformers (gpu)",
        QWEN,
    )
    assert {"weights", "kv_cache", "activations", "overhead"} <= set(estimate["parts"])
    assert estimate["explain"].startswith("needs about 3.9 GiB on one GPU: weights 0.9")
    assert record["request"]["gpu_mem"] == estimate["per_gpu_bytes"] == estimate["total_bytes"]


def test_warn_mode_keeps_an_eval_too_big_with_the_warning_on_it(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, eval_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub, MLOC_MEMFIT="warn")
    answer, record = submitted(http, evaluate(LLAMA_70B))
    warning = record["memory_estimate"]["warning"]
    assert warning.startswith("needs about 136.1 GiB on one GPU: ")
    assert warning.endswith(
        "the largest GPU registered has 24 GiB: it will likely run out of memory (kept: MLOC_MEMFIT=warn)"
    )
    assert answer["memory_warning"] == warning


def test_warn_mode_keeps_the_task_with_the_warning_on_it(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB, memory=GIB))
    http = orchestrator(hub, MLOC_MEMFIT="warn")
    answer, record = submitted(http, sft())
    warning = record["memory_estimate"]["warning"]
    assert warning.startswith("needs about 69.3 GiB on one GPU: ")
    assert warning.endswith(
        "; the largest GPU registered has 24 GiB: it will likely run out of memory (kept: MLOC_MEMFIT=warn)"
    )
    assert answer["memory_warning"] == warning
    # Placed by the user's numbers: the request asks for no more GPU memory than they did.
    assert answer["worker_id"] == "l4" and record["request"]["gpu_mem"] == 0
    # A CPU task is compared with the largest worker's memory, in warn mode only.
    cpu = sft(gpus=0)
    _, record = submitted(http, cpu)
    assert record["memory_estimate"]["device"] == "cpu"
    assert "; the largest worker registered has 1 GiB of memory: it may not fit" in record["memory_estimate"]["warning"]


def test_a_cpu_task_is_never_refused_or_warned_about_in_refuse_mode(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB, memory=GIB))
    http = orchestrator(hub)
    answer, record = submitted(http, sft(gpus=0))
    assert answer["worker_id"] == "l4"
    estimate = record["memory_estimate"]
    assert estimate["device"] == "cpu" and estimate["total_bytes"] > GIB and "warning" not in estimate


def test_with_no_gpu_registered_the_task_is_kept_and_waits_for_one_big_enough(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    http = orchestrator(hub)
    answer, record = submitted(http, sft())
    assert answer["state"] == "pending"
    estimate = record["memory_estimate"]
    assert "; no GPU is registered to compare with, so the task is kept" in estimate["warning"]
    # A pool scaled from zero must bring a GPU that holds it.
    assert record["request"]["gpu_mem"] == estimate["per_gpu_bytes"] == estimate["total_bytes"]
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    deadline = time.monotonic() + 20
    while "or more" not in (waiting := http.get(f"/api/v1/tasks/{answer['task_id']}").json())["pending_reason"]:
        assert time.monotonic() < deadline, waiting
        time.sleep(0.1)
    assert waiting["state"] == "pending"
    assert "needs 1 GPU(s) of 69.3Gi or more" in waiting["pending_reason"]


def test_gpu_memory_given_by_the_user_overrides_the_estimate(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub)
    answer, record = submitted(http, sft(memory="20Gi"))
    assert answer["worker_id"] == "l4"
    estimate = record["memory_estimate"]
    assert estimate["overridden_by_user"] == {"gpu_memory_bytes": 20 * GIB, "estimated_bytes": estimate["total_bytes"]}
    assert estimate["warning"].startswith(
        "spec.resources.hardware.gpu.memory (20 GiB) is below the estimate (needs about 69.3"
    )
    assert record["request"]["gpu_mem"] == 20 * GIB


# -------------------------------------------------------------------------------------- placement


def test_gpu_type_any_is_placed_on_a_gpu_model_big_enough(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB, gpus=2), gpu_worker("a100", A100, 80 * GIB))
    http = orchestrator(hub)
    dry = http.post("/api/v1/tasks?dry_run=true", json=sft()).json()
    assert dry["would_place_on"] == ["a100"]
    assert dry["memory_estimate"]["explain"].startswith("needs about 69.3 GiB on one GPU")
    first, record = submitted(http, sft())
    assert first["worker_id"] == "a100"
    assert record["request"]["gpu_mem"] == record["memory_estimate"]["total_bytes"]
    # The A100 is taken: the next one waits for it rather than landing on an L4 it would not fit.
    second, _ = submitted(http, sft())
    assert second["state"] == "pending" and "needs 1 GPU(s) of 69.3Gi or more" in second["pending_reason"]
    # A small task fits either model.
    small, record = submitted(http, serve())
    assert small["worker_id"] in ("l4", "a100")
    assert record["memory_estimate"]["total_bytes"] < 4 * GIB


def test_the_estimate_is_on_the_task_and_in_the_dry_run(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("a100", A100, 80 * GIB))
    http = orchestrator(hub)
    dry = http.post("/api/v1/tasks?dry_run=true", json=sft()).json()
    assert http.get("/api/v1/tasks").json()["total"] == 0
    _, record = submitted(http, sft())
    estimate = record["memory_estimate"]
    assert estimate == dry["memory_estimate"]
    assert estimate["total_bytes"] == sum(estimate["parts"].values())
    assert {"weights", "adapter", "optimizer", "activations", "overhead"} <= set(estimate["parts"])
    assert estimate["explain"].startswith("needs about 69.3 GiB on one GPU: weights 15.0")
    assert (estimate["task"], estimate["kind"], estimate["model_key"]) == (
        "sft with lora",
        "sft with lora (gpu)",
        LLAMA,
    )
    assert estimate["facts_from"] == f"{hub.url}/{LLAMA}/resolve/main/config.json"


def test_a_dataset_task_a_replica_group_and_a_pipelines_steps_carry_the_estimate_too(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    http = orchestrator(hub)  # no GPU registered: each waits for one as big as its estimate

    def estimate_of(body: dict[str, Any]) -> dict[str, Any]:
        estimate: dict[str, Any] = http.post("/api/v1/tasks?dry_run=true", json=body).json()["memory_estimate"]
        assert estimate["total_bytes"] > 0
        return estimate

    dataset = serve()
    dataset["spec"]["inference"] = {"input": {"path": "/data/rows.jsonl", "chunk_rows": 100}, "max_tokens": 32}
    dataset["spec"]["resources"]["replicas"] = 2
    group = serve()
    group["spec"]["resources"]["replicas"] = 2
    pipeline = [serve(), serve(dependsOn=["serve"])]
    pipeline[1]["metadata"]["name"] = "after"
    expected: dict[str, dict[str, Any]] = {}
    for body, parts in ((dataset, "chunks"), (group, "replicas")):
        answer = http.post("/api/v1/tasks", json=body).json()
        for task_id in [answer["task_id"], *(part["task_id"] for part in answer[parts])]:
            expected[task_id] = estimate_of(body)
    steps = http.post("/api/v1/tasks/bulk", json=pipeline)
    assert steps.status_code == 201, steps.text
    for task in steps.json()["tasks"]:
        expected[task["task_id"]] = estimate_of(serve())

    assert len(expected) == 8
    for task_id, estimate in expected.items():
        record = http.get(f"/api/v1/tasks/{task_id}").json()
        assert record["memory_estimate"]["total_bytes"] == estimate["total_bytes"], record
        # What placement asks of a GPU is the estimate, on every part that runs.
        if not record.get("children"):
            assert record["request"]["gpu_mem"] == estimate["per_gpu_bytes"], (record["name"], record["request"])


# ------------------------------------------------------------------------------------------ facts


def test_the_hub_config_is_read_once_then_kept(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("a100", A100, 80 * GIB))
    first = orchestrator(hub)
    submitted(first, sft())
    submitted(first, sft())
    assert len(hub.hub.seen("GET", f"/{LLAMA}/resolve/main/config.json")) == 1
    # Another orchestrator process finds them in Redis.
    other = orchestrator(hub)
    _, record = submitted(other, sft())
    assert record["memory_estimate"]["total_bytes"] > 60 * GIB
    assert len(hub.hub.seen("GET", "config.json")) == 1


def test_facts_a_worker_publishes_are_used_without_the_hub(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    facts = facts_from_config(LLAMA3_8B, source="/models/private/config.json")
    register(redis_url, gpu_worker("a100", A100, 80 * GIB, facts={"org/private-llama": facts.to_wire()}))
    http = orchestrator(hub)
    answer, record = submitted(http, sft("org/private-llama"))
    assert answer["worker_id"] == "a100"
    assert record["memory_estimate"]["facts_from"] == "/models/private/config.json on worker a100"
    assert record["memory_estimate"]["explain"].startswith("needs about 69.3 GiB")
    assert hub.hub.seen(contains="private") == []


def test_an_https_gguf_is_sized_from_its_header_read_in_growing_ranges(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    # A 100k-token vocabulary: a header of about 2 MiB, past the first read.
    hub.hub.files["model.gguf"] = tiny_llama_gguf(vocab=100_000)
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub)
    url = f"{hub.url}/files/model.gguf"
    _, record = submitted(http, serve(url))
    estimate = record["memory_estimate"]
    assert estimate["facts_from"] == url and estimate["model_key"] == url
    assert estimate["explain"].startswith("needs about ")
    assert [r.headers["range"] for r in hub.hub.seen("GET", "/files/model.gguf")] == [
        "bytes=0-1048575",
        "bytes=0-4194303",
    ]


def test_a_config_that_cannot_be_read_leaves_the_users_numbers_with_the_reason(
    redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]
) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub)
    answer, record = submitted(http, sft("nobody/missing"))
    url = f"{hub.url}/nobody/missing/resolve/main/config.json"
    assert record["memory_estimate"] == {
        "estimated": False,
        "warning": f"no estimate: {url} could not be read: HTTP 404; placed by spec.resources.hardware",
    }
    assert answer["worker_id"] == "l4" and record["request"]["gpu_mem"] == 0
    _, record = submitted(http, sft("org/broken"))
    warning = record["memory_estimate"]["warning"]
    assert warning.startswith(f"no estimate: {hub.url}/org/broken/resolve/main/config.json: field num_hidden_layers")
    assert warning.endswith("; placed by spec.resources.hardware")
    # An orchestrator that does not read the hub says so.
    offline = orchestrator(MLOC_OFFLINE="1")
    _, record = submitted(offline, sft(QWEN))
    assert (
        "could not be read: the orchestrator does not read the hub (MLOC_OFFLINE=1"
        in (record["memory_estimate"]["warning"])
    )


def test_memfit_off_estimates_nothing(redis_url: str, hub: HubServer, orchestrator: Callable[..., TestClient]) -> None:
    register(redis_url, gpu_worker("l4", L4, 24 * GIB))
    http = orchestrator(hub, MLOC_MEMFIT="off")
    answer, record = submitted(http, sft())
    assert answer["worker_id"] == "l4" and record["memory_estimate"] is None
    assert hub.hub.seen("GET", "config.json") == []


# ----------------------------------------------------------------------------- a real worker's peak


def inference_on(model: dict[str, Any], name: str) -> dict[str, Any]:
    return mloc_task(
        name,
        {
            "taskType": "inference",
            "model": {**model, "engine": "transformers"},
            "inference": {"prompts": ["Question: what is two plus two?\nAnswer:"] * 4, "max_tokens": 8},
        },
    )


@pytest.mark.slow
@pytest.mark.extra("inference")
def test_a_run_records_its_peak_and_corrects_the_next_estimate_of_its_model_and_kind(
    make_cluster: Callable[..., LocalCluster],
    client_for: Callable[..., Client],
    tmp_path: Path,
    sync_redis: redis.Redis,
) -> None:
    first = build_tiny_causal_lm(tmp_path / "first")
    # Big enough (about 50 MB of float32 weights) that loading it adds RSS beyond what the allocator kept.
    second = build_tiny_causal_lm(tmp_path / "second", hidden_size=512, layers=4)
    cluster = make_cluster(1, env={"HEARTBEAT_INTERVAL_SEC": "1"})
    client = client_for(cluster)

    def run(model: dict[str, Any], name: str) -> dict[str, Any]:
        record = client.wait(client.submit(inference_on(model, name))["task_id"], timeout=300)
        assert record["state"] == "succeeded", record
        return record

    # A fresh executor process imports torch during the task: its peak is recorded, but not compared.
    record = run({"source": {"type": "local", "identifier": str(first)}}, "first")
    peak = record["memory_peak"]
    assert record["memory_peak_bytes"] == peak["rss_peak_bytes"] > peak["rss_start_bytes"] > 0
    assert (peak["device"], peak["libraries_loaded"], peak["model_warm"]) == ("cpu", False, False)
    assert record["memory_estimate"]["kind"] == "inference on transformers (cpu)"
    local = f"local:{first}"
    assert sync_redis.get(keys.memory_ratio(local, "inference on transformers (cpu)")) is None

    # The same process, its libraries loaded, a model it does not hold: measured against the estimate.
    record = run({"source": {"type": "local", "identifier": str(second)}}, "second")
    assert record["memory_peak"]["libraries_loaded"] and not record["memory_peak"]["model_warm"]
    kind = record["memory_estimate"]["kind"]
    stored = sync_redis.get(keys.memory_ratio(f"local:{second}", kind))
    assert stored is not None, record["memory_peak"]
    measured = json.loads(stored)
    peak = record["memory_peak"]
    assert measured["measured_bytes"] == peak["rss_peak_bytes"] - peak["rss_start_bytes"]
    assert measured["estimated_bytes"] == record["memory_estimate"]["total_bytes"]
    assert measured["task_id"] == record["task_id"]

    # The next estimate of that model and kind is corrected by it, and says so (admission keeps what
    # it read of the ratios for a moment).
    time.sleep(admission.RATIO_CACHE_SEC)
    again = run({"source": {"type": "local", "identifier": str(second)}}, "again")
    estimate = again["memory_estimate"]
    factor = memoryhistory.Measured(measured["ratio"], 1, 1, "", 0).applied
    assert any(note.startswith(f"corrected x{factor:.2f} by task {record['task_id']}") for note in estimate["notes"])
    assert estimate["total_bytes"] - estimate["parts"].get("correction", 0) == measured["estimated_bytes"]
    assert again["memory_peak"]["model_warm"]  # held from the run before: not compared again
    shown = mloc("show", again["task_id"], env={"MLOC_API_URL": cluster.api_url})
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert fields["memory"] == estimate["explain"] and "measured correction" in fields["memory"]
    assert fields["memory-note"] == estimate["notes"][-1]
    # The warm executor process held the first runs' models already: what this run added is said apart.
    assert re.fullmatch(
        r"\d+\.\d [MG]iB \(RSS, measured; \d+\.\d [KMG]iB above the \d+\.\d [MG]iB its executor process held at its start\)",
        fields["memory-peak"],
    ), fields
    assert (
        json.loads(sync_redis.get(keys.memory_ratio(f"local:{second}", kind)) or "{}")["task_id"] == record["task_id"]
    )

    # A packaged model the worker built: it publishes its facts, and admission sizes the next task by them.
    asked = time.monotonic()
    run({"source": {"type": "package", "identifier": "mloc-tiny-llama"}}, "packaged")
    deadline = time.monotonic() + 30
    while "package:mloc-tiny-llama" not in json.loads(sync_redis.hget(keys.worker("local-1"), MODEL_FACTS) or "{}"):
        assert time.monotonic() < deadline, "the worker never published the packaged model's facts"
        time.sleep(0.2)
    # Admission asked the workers when "packaged" was submitted, and asks again after a pause only (and
    # only workers whose heartbeat is current, which a loaded machine can delay): it sees them in a while.
    time.sleep(max(0.0, asked + factfinder.ASK_AGAIN_SEC - time.monotonic()))
    deadline = time.monotonic() + 30
    while True:
        answer = client.submit(inference_on({"source": {"type": "package", "identifier": "mloc-tiny-llama"}}, "sized"))
        estimate = client.task(answer["task_id"])["memory_estimate"]
        if "facts_from" in estimate or time.monotonic() > deadline:
            break
        time.sleep(factfinder.ASK_AGAIN_SEC)
    assert estimate.get("facts_from", "").endswith("config.json on worker local-1"), estimate
    assert estimate["model_key"] == "package:mloc-tiny-llama"


def test_memfit_settings_read_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().memfit == "refuse"
    monkeypatch.setenv("MLOC_MEMFIT", " Warn ")
    assert Settings().memfit == "warn"
    monkeypatch.setenv("MLOC_MEMFIT", "maybe")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert (
        describe_invalid(caught.value)
        == "invalid setting MLOC_MEMFIT='maybe': Input should be 'refuse', 'warn' or 'off'"
    )
    # The hub is read unless MLOC_OFFLINE says otherwise, else HF_HUB_OFFLINE; empty values are unset.
    monkeypatch.delenv("MLOC_MEMFIT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setenv("HF_ENDPOINT", "")
    assert Settings().reads_hub and Settings().hub_url == "https://huggingface.co"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not Settings().reads_hub
    monkeypatch.setenv("MLOC_OFFLINE", "0")
    assert Settings().reads_hub
