"""Replica groups: prompts sharded over workers and merged back in prompt order."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mloc.client import Client
from mloc.errors import SpecError
from mloc.localcluster import LocalCluster
from mloc.orchestrator.groups import OFFSET_LABEL, merge, shards
from mloc.spec import load, validate
from tests.support.cli import mloc
from tests.support.tiny_model import build_tiny_causal_lm


def inference_task(model: str, prompts: list[str], replicas: int, messages: str = "") -> str:
    listed = "".join(f"    - {p!r}\n" for p in prompts)
    return (
        "taskType: inference\n"
        f"resources: {{replicas: {replicas}}}\n"
        f"model: {{source: {{type: local, identifier: {model!r}}}, engine: transformers}}\n"
        "inference:\n  max_tokens: 4\n  temperature: 0\n  prompts:\n" + listed + messages
    )


def test_shards_are_contiguous_and_cover_every_input() -> None:
    doc = load(
        inference_task(
            "/m",
            [f"p{i}" for i in range(5)],
            3,
            "  messages:\n    - [{role: user, content: hi}]\n    - [{role: user, content: yo}]\n",
        )
    )
    parts = shards(doc, "job")
    assert [p["metadata"]["labels"][OFFSET_LABEL] for p in parts] == ["0", "3", "5"]
    assert [p["spec"]["inference"]["prompts"] for p in parts] == [["p0", "p1", "p2"], ["p3", "p4"], []]
    assert [len(p["spec"]["inference"]["messages"]) for p in parts] == [0, 0, 2]
    assert all(validate(p).spec.resources.replicas == 1 for p in parts)
    with pytest.raises(SpecError, match="use at most 2 replicas"):
        shards(load(inference_task("/m", ["a", "b"], 3)), "job")


def test_merge_restores_prompt_order_and_adds_usage() -> None:
    first = {
        "ok": True,
        "model": "m",
        "items": [{"index": 1, "output": "b"}, {"index": 0, "output": "a"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "latency_sec": 2.0, "num_requests": 2},
    }
    second = {
        "ok": True,
        "model": "m",
        "items": [{"index": 0, "output": "c"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "latency_sec": 5.0, "num_requests": 1},
    }
    merged = merge("p", [first, second], [0, 2])
    assert [i["output"] for i in merged["items"]] == ["a", "b", "c"]
    assert merged["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "latency_sec": 5.0, "num_requests": 3}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.extra("inference")
def test_replicas_run_on_different_workers_and_merge_in_order(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tiny_model: Path, tmp_path: Path
) -> None:
    # A heartbeat TTL that a loaded machine cannot overrun: a worker seen as unresponsive at submit
    # would leave its replica to a later pass (and possibly the other worker).
    cluster = make_cluster(2, env={"HEARTBEAT_TTL_SEC": "30"})
    client = client_for(cluster)
    prompts = [f"Question: {word}?\nAnswer:" for word in ("one", "two", "three", "four", "five")]
    answer = client.submit(inference_task(str(tiny_model), prompts, 2).encode())
    assert len(answer["replicas"]) == 2
    placed = {r["worker_id"] for r in answer["replicas"]}
    assert placed == {"local-1", "local-2"}, (
        [client.task(r["task_id"])["pending_reason"] for r in answer["replicas"]],
        [(w["worker_id"], w["status"], w.get("slots_free"), w.get("task_types")) for w in client.workers()["items"]],
    )
    deadline = time.monotonic() + 300
    while (record := client.task(answer["task_id"]))["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, record
        time.sleep(0.5)
    assert record["state"] == "succeeded", record
    assert len(record["children"]) == 2
    result = client.result(answer["task_id"])
    assert [item["index"] for item in result["items"]] == [0, 1, 2, 3, 4]
    assert result["replicas"] == 2 and result["usage"]["num_requests"] == 5
    merged_file = tmp_path / "results" / answer["task_id"] / "responses.json"
    assert merged_file.exists()
    said = client.logs(answer["task_id"])["lines"]
    ended = said[-1]  # the parent's own log says how it ended
    assert (ended["event"], ended["text"]) == ("succeeded", "succeeded: its 2 replicas succeeded"), ended
    # ...and each replica's end before that: where it ran, how long, which prompts.
    children = record["children"]
    ends = sorted(e["text"] for e in said if e["event"] == "replica_succeeded")  # either may end first
    assert len(ends) == 2 and all(
        re.fullmatch(r"replica \d \(\w{8}\) succeeded on local-\d in [\d.]+ s: .*", e) for e in ends
    )
    assert ends[0].startswith(f"replica 0 ({children[0][:8]}) succeeded on ") and ends[0].endswith(": prompts 1-3")
    assert ends[1].startswith(f"replica 1 ({children[1][:8]}) succeeded on ") and ends[1].endswith(": prompts 4-5")
    # Its progress is its replicas', and a replica says which prompts it held.
    progress = client.task(answer["task_id"])["progress"]
    assert progress["message"] == "5 of 5 prompts done over 2 replicas", progress
    shown = mloc("show", children[1], env={"MLOC_API_URL": cluster.api_url}).stdout
    assert re.search(rf"^replica of +{answer['task_id']} \(replica 1, prompts 4-5\)$", shown, re.M), shown
    # --chunks adds the replicas' own lines, each marked with its replica.
    every = mloc("logs", answer["task_id"], "--chunks", "--json", env={"MLOC_API_URL": cluster.api_url})
    assert every.returncode == 0, every.stderr
    assert {e["replica"] for e in json.loads(every.stdout)["lines"] if "replica" in e} == {0, 1}
    starts = [e["text"] for e in said if e["event"] == "replica_started"]
    assert all(re.fullmatch(r"replica [01] \(\w{8}\) started on local-\d: prompts (1-3|4-5)", e) for e in starts), (
        starts
    )
    single = client.submit(inference_task(str(tiny_model), prompts, 1).encode())
    deadline = time.monotonic() + 300
    while client.task(single["task_id"])["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    expected = [i["output"] for i in client.result(single["task_id"])["items"]]
    assert [i["output"] for i in result["items"]] == expected


@pytest.mark.extra("inference")
def test_cancelling_a_group_cancels_its_replicas(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tiny_model: Path
) -> None:
    cluster = make_cluster(1, worker_env=[{"TASK_TOPICS": "tasks.echo"}])  # nobody takes inference
    client = client_for(cluster)
    answer = client.submit(inference_task(str(tiny_model), ["a", "b", "c"], 3).encode())
    assert all(r["worker_id"] is None for r in answer["replicas"])
    assert client.cancel(answer["task_id"])["state"] == "cancelled"
    assert client.task(answer["task_id"])["state"] == "cancelled"
    assert {client.task(r["task_id"])["state"] for r in answer["replicas"]} == {"cancelled"}
    # A group runs again only whole: neither it nor a replica of it is resumed.
    with pytest.raises(Exception, match="is a replica group, which runs again only whole: submit it again"):
        client.resume(answer["task_id"])
    with pytest.raises(Exception, match=f"is a part of task {answer['task_id']}"):
        client.resume(answer["replicas"][0]["task_id"])


def test_replicas_only_for_inference(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    client = client_for(make_cluster(1))
    with pytest.raises(Exception, match="supported for inference tasks"):
        client.submit(b"taskType: echo\nresources: {replicas: 2}\n")
