"""A dataset task runs as chunks on a real local cluster: cut as they are needed, taken by whichever worker
is free, joined in row order; bad rows counted over all chunks; a failed task resumed without redoing the
chunks that finished, nor the finished rows of those that did not; a chunk whose worker was lost keeps
the rows that worker finished."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.cli.output import duration
from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster
from mloc.spec.dataset import CHUNK_LABEL
from tests.support.cli import mloc

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}


def write_rows(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"qid": f"q{i:03d}", "question": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def task(data: Path, *, chunk_rows: int, replicas: int = 1, max_row_errors: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": "chunked"},
        "spec": {
            "taskType": "inference",
            "model": TINY,
            "resources": {"replicas": replicas},
            "inference": {
                "max_tokens": 2,
                "temperature": 0,
                "batch_size": 4,
                "input": {
                    "path": str(data),
                    "columns": {"prompt": "question", "id": "qid"},
                    "chunk_rows": chunk_rows,
                    "max_row_errors": max_row_errors,
                },
            },
        },
    }


def lines_of(client: Client, task_id: str) -> list[dict[str, Any]]:
    return list(client.result_lines(task_id))


@pytest.mark.extra("inference")
def test_chunks_spread_over_workers_and_join_in_row_order(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    prompts = [f"Question: what is {i} plus one?\nAnswer:" for i in range(47)]
    data = write_rows(tmp_path / "questions.jsonl", prompts)
    cluster = make_cluster(2)
    client = client_for(cluster)
    answer = client.submit(task(data, chunk_rows=5, replicas=2))
    assert len(answer["chunks"]) == 2
    record = client.wait(answer["task_id"], timeout=300)
    assert record["state"] == "succeeded", record
    assert record["chunk_rows"] == 5

    chunks = [client.task(child) for child in record["children"]]
    # 47 rows in chunks of 5: 10 chunks hold rows; the window may have cut one more before the end was known.
    assert 10 <= len(chunks) <= 11
    assert [int(c["labels"][CHUNK_LABEL]) for c in chunks] == list(range(len(chunks)))
    assert all(c["state"] == "succeeded" for c in chunks[:10])
    if len(chunks) == 11 and chunks[10]["state"] == "cancelled":  # it may have run (and found no rows) first
        assert chunks[10]["reason_code"] == "past_the_data", chunks[10]
        assert chunks[10]["reason"].startswith("not needed: the data ended before its rows"), chunks[10]
        # Nobody asked for it: the owner's usage does not count it as a cancelled task.
        totals = client.stats(user=record["owner"])["users"][0]["totals"]
        assert "tasks.inference.cancelled" not in totals, totals
    assert {c["worker_id"] for c in chunks[:10]} == {"local-1", "local-2"}  # any free worker takes the next one

    summary = client.result(answer["task_id"])
    assert (summary["rows"], summary["succeeded"], summary["failed"], summary["chunks"]) == (47, 47, 0, 10)
    assert summary["usage"]["completion_tokens"] == 47 * 2
    # Time and speed are the task's own, not its slowest chunk's; model loading adds up over chunks.
    used, took = summary["usage"], record["finished_at"] - record["started_at"]
    assert abs(used["latency_sec"] - took) < 0.5 and used["latency_sec"] > max(
        client.result(c["task_id"])["usage"]["latency_sec"] for c in chunks[:10]
    )
    assert used["tokens_per_sec"] == pytest.approx(47 * 2 / used["latency_sec"], rel=0.05)
    loads = [client.result(c["task_id"])["usage"]["load_sec"] for c in chunks if c["state"] == "succeeded"]
    assert used["load_sec"] == pytest.approx(sum(loads[:10]), abs=0.01)
    lines = lines_of(client, answer["task_id"])
    assert [line["id"] for line in lines] == [f"q{i:03d}" for i in range(47)]
    assert all(line["error"] is None and line["completion_tokens"] == 2 for line in lines)
    merged = tmp_path / "results" / answer["task_id"] / "results.jsonl"
    assert merged.read_text().count("\n") == 47

    # The parent's own log tells the run: each chunk's end (its rows, where and how long), then its own.
    said = client.logs(answer["task_id"])["lines"]
    for index, chunk in enumerate(chunks[:10]):
        rows = f"rows {index * 5 + 1}-{min(index * 5 + 5, 47)}"
        line = next(e for e in said if e["text"].startswith(f"chunk {index} ({chunk['task_id'][:8]}) succeeded"))
        assert line["text"].endswith(rows) and f" on {chunk['worker_id']} in " in line["text"], line
    assert said[-1]["event"] == "succeeded", said[-1]
    assert said[-1]["text"].endswith(": 47 rows done in 10 chunk(s)"), said[-1]
    env = {"MLOC_API_URL": cluster.api_url}
    shown = mloc("show", answer["task_id"], env=env).stdout
    assert re.search(r"^progress +47 rows done in 10 chunk\(s\)$", shown, re.M), shown
    past = " (and 1 cut past the data's end)" if len(chunks) == 11 else ""
    assert re.search(
        rf"^chunks +10{re.escape(past)}, 5 rows each \(`mloc logs {answer['task_id']} --chunks`", shown, re.M
    )
    assert "attempts" not in shown  # the parent runs nowhere itself; its chunks have attempts
    chunk_shown = mloc("show", chunks[3]["task_id"], env=env).stdout
    assert re.search(rf"^chunk of +{answer['task_id']} \(chunk 3\)$", chunk_shown, re.M), chunk_shown
    # It was cut after its dataset task was submitted, and waited from its cut, not from that submit.
    assert chunks[3]["cut_at"] > record["created_at"] and chunks[3]["created_at"] == record["created_at"]
    assert re.search(r"^created +\S+ \S+ \(.*\), with its dataset task$", chunk_shown, re.M), chunk_shown
    assert re.search(r"^cut +\S+ \S+ \(.* ago\)$", chunk_shown, re.M), chunk_shown
    waited = duration(chunks[3]["started_at"] - chunks[3]["cut_at"])
    assert re.search(rf"^queued +{re.escape(waited)} \(cut to started\)$", chunk_shown, re.M), chunk_shown
    # --chunks adds the chunks' own lines, in time order, each marked with its chunk.
    every = mloc("logs", answer["task_id"], "--chunks", "--json", env=env)
    assert every.returncode == 0, every.stderr
    merged_log = json.loads(every.stdout)["lines"]
    assert {entry["chunk"] for entry in merged_log if "chunk" in entry} == set(range(len(chunks)))
    assert [float(e["ts"]) for e in merged_log] == sorted(float(e["ts"]) for e in merged_log)
    assert len(merged_log) == len(said) + sum(len(client.logs(c["task_id"])["lines"]) for c in chunks)
    text = mloc("logs", answer["task_id"][:8], "--chunks", "--source", "mloc", env=env).stdout
    assert re.search(rf"INFO +task +mloc +chunk 9 \({chunks[9]['task_id'][:8]}\) succeeded on local-", text), text
    assert re.search(r"INFO +chunk 9 +mloc +started on local-\d \(run 1\)$", text, re.M), text
    refused = mloc("logs", answer["task_id"], "--chunks", "-f", env=env)
    assert refused.returncode == 2 and "--chunks does not follow" in refused.stderr, refused.stderr
    # A listing shows the dataset task, not its chunks, unless asked for them.
    listed = client.tasks()
    assert [item["task_id"] for item in listed["items"]] == [answer["task_id"]] and listed["total"] == 1
    assert client.tasks(state="succeeded")["total"] == 1
    every_task = client.tasks(children="true", page_size=50)
    assert every_task["total"] == 1 + len(chunks)
    # The task first, then its chunks in order (they share its place in the list).
    assert [item["task_id"] for item in every_task["items"]] == [answer["task_id"], *record["children"]]
    table = mloc("tasks", "-q", env=env).stdout.split()
    assert table == [answer["task_id"]], table
    assert len(mloc("tasks", "-q", "--children", env=env).stdout.split()) == 1 + len(chunks)
    # It runs nowhere itself: its WORKER cell says over how many chunks it ran (those that held rows, as its
    # result counts them: one cut past the data's end is not).
    row = next(line for line in mloc("tasks", env=env).stdout.splitlines() if answer["task_id"][:8] in line)
    assert " 10 chunk(s) " in row and client.result(answer["task_id"])["chunks"] == 10, row


@pytest.mark.extra("inference")
def test_a_task_that_reads_part_of_its_data_ends_at_its_max_rows(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    # 30 rows; the task reads rows 5-14 in chunks of 4 (4, 4, 2). The last chunk says the data goes on:
    # it does, past the task's own window, which ends there.
    data = write_rows(tmp_path / "questions.jsonl", [f"Question: what is {i} plus one?\nAnswer:" for i in range(30)])
    window = task(data, chunk_rows=4)
    window["spec"]["inference"]["input"] |= {"skip_rows": 5, "max_rows": 10}
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit(window)["task_id"]
    record = client.wait(task_id, timeout=300)
    assert record["state"] == "succeeded", record
    assert [line["id"] for line in lines_of(client, task_id)] == [f"q{i:03d}" for i in range(5, 15)]
    assert (client.result(task_id)["rows"], client.result(task_id)["chunks"]) == (10, 3)
    assert record["progress"]["message"] == "10 rows done in 3 chunk(s)", record["progress"]
    # Fewer rows than one chunk holds: one chunk, and the same end.
    single = task(data, chunk_rows=100)
    single["spec"]["inference"]["input"]["max_rows"] = 3
    record = client.wait(client.submit(single)["task_id"], timeout=300)
    assert record["state"] == "succeeded", record
    assert record["progress"]["message"] == "3 rows done in 1 chunk(s)", record["progress"]


@pytest.mark.extra("inference")
def test_a_failed_dataset_task_resumes_without_redoing_its_finished_chunks(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    prompts = [f"Question: what is {i} plus one?\nAnswer:" for i in range(20)]
    broken = list(prompts)
    broken[14] = ""  # an empty prompt in the third chunk's second batch; no bad row is allowed
    data = write_rows(tmp_path / "questions.jsonl", broken)
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit(task(data, chunk_rows=5))["task_id"]
    record = client.wait(task_id, timeout=300)
    assert record["state"] == "failed", record
    assert "chunk 2" in record["reason"] and f"mloc resume {task_id}" in record["reason"]
    assert "prompt column 'question' is empty" in record["reason"]
    first = [client.task(child) for child in record["children"]]
    assert [c["state"] for c in first] == ["succeeded", "succeeded", "failed"]
    said = client.logs(task_id)["lines"]
    told = next(e for e in said if e["event"] == "chunk_failed")
    assert told["level"] == "ERROR" and told["text"].startswith(
        f"chunk 2 ({first[2]['task_id'][:8]}) failed on local-1:"
    )
    ended = next(e for e in said if e["event"] == "failed")
    assert f"mloc resume {task_id}" in ended["text"], said
    # The finished chunks' lines stand, in order, and are served while the task is failed, with those of
    # the rows the failed chunk finished before its bad row's batch.
    assert [line["id"] for line in lines_of(client, task_id)] == [f"q{i:03d}" for i in range(14)]
    # Its progress counts them too: those of the failed chunk are kept by a resume.
    assert client.task(task_id)["progress"]["message"] == (
        "10 rows done in 2 chunk(s); 1 cut chunk not finished, which had done 4 rows that a resume keeps"
    )

    write_rows(data, prompts)  # the row fixed
    failed_at = record["finished_at"]
    time.sleep(2)  # it sits failed a while: not part of its run's time
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOC_")}
    env["MLOC_API_URL"] = cluster.api_url
    resumed_at = time.time()
    resumed = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "resume", task_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "2 finished chunk(s) kept, 1 to run again (keeping the 4 rows they had done), then the rest of the data"
        in resumed.stdout
    ), resumed.stdout
    told = [e["text"] for e in client.logs(task_id)["lines"] if e.get("event") == "resumed"]
    assert len(told) == 1 and told[0].startswith("resumed by "), told
    assert told[0].endswith(
        ": 2 finished chunk(s) kept; 1 cut chunk(s) not finished run again (keeping the 4 rows they had done), "
        "then the rows after them"
    )
    record = client.wait(task_id, timeout=300)
    assert record["state"] == "succeeded", record
    second = [client.task(child) for child in record["children"]]
    assert [c["task_id"] for c in second[:2]] == [c["task_id"] for c in first[:2]]  # not run again
    assert all(c["attempts"] == 1 for c in second[:2])
    assert second[2]["task_id"] != first[2]["task_id"]
    # The failed chunk's first batch (rows 10-13) finished: its lines are kept, the fixed row runs.
    said = [line["text"] for line in client.logs(second[2]["task_id"])["lines"]]
    assert "4 rows kept from an earlier run, not generated again" in said, said
    assert client.result(second[2]["task_id"])["kept_rows"] == 4
    lines = lines_of(client, task_id)
    assert [line["id"] for line in lines] == [f"q{i:03d}" for i in range(20)]
    assert all(line["error"] is None for line in lines)
    assert client.result(task_id)["rows"] == 20
    # Its time and speed leave out the time it sat failed; mloc show says how long that was.
    assert resumed_at - failed_at - 0.1 < record["stopped_sec"] < time.time() - failed_at, record
    took = record["finished_at"] - record["started_at"] - record["stopped_sec"]
    assert client.result(task_id)["usage"]["latency_sec"] == pytest.approx(took, abs=0.5)
    shown = mloc("show", task_id, env={"MLOC_API_URL": cluster.api_url}).stdout
    ran, stopped = duration(took), duration(record["stopped_sec"])
    assert re.search(
        rf"^ran +{re.escape(ran)} \(and {re.escape(stopped)} stopped before it was resumed\)$", shown, re.M
    )

    # Only a failed or cancelled dataset task is resumed.
    with pytest.raises(Exception, match="only a failed or cancelled task is resumed"):
        client.resume(task_id)


@pytest.mark.extra("inference")
def test_bad_rows_are_counted_over_all_chunks(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    prompts = [f"Question: what is {i} plus one?\nAnswer:" if i % 5 != 2 else "" for i in range(15)]
    data = write_rows(tmp_path / "questions.jsonl", prompts)  # one bad row in each chunk of 5: 3 in all
    cluster = make_cluster(1)
    client = client_for(cluster)
    spec = tmp_path / "allowed.json"
    spec.write_text(json.dumps(task(data, chunk_rows=5, max_row_errors=3)))
    # The task runs nowhere itself: the CLI says where its first chunk went.
    said = mloc("submit", str(spec), env={"MLOC_API_URL": cluster.api_url}).stdout
    found = re.fullmatch(
        r"submitted ([0-9a-f-]{36}) \(.*allowed\.json\), its first 1 chunk\(s\) assigned to local-1\n", said
    )
    assert found, said
    allowed = found.group(1)
    assert client.wait(allowed, timeout=300)["state"] == "succeeded"
    assert client.result(allowed)["failed"] == 3
    refused = client.submit(task(data, chunk_rows=5, max_row_errors=2))["task_id"]
    record = client.wait(refused, timeout=300)
    assert record["state"] == "failed" and "3 bad rows over its chunks" in record["reason"], record
    assert "max_row_errors (2)" in record["reason"]


@pytest.mark.extra("inference")
def test_a_chunk_whose_worker_is_lost_keeps_the_rows_that_worker_finished(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    rows = 600
    data = write_rows(tmp_path / "questions.jsonl", [f"Question: what is {i} plus one?\nAnswer:" for i in range(rows)])
    cluster = make_cluster(2)
    client = client_for(cluster)
    body = task(data, chunk_rows=rows)
    body["spec"]["inference"] |= {"batch_size": 2, "max_tokens": 8}
    parent = client.submit(body)["task_id"]
    deadline = time.monotonic() + 120
    while not (children := client.task(parent).get("children")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    chunk = children[0]
    written = tmp_path / "results" / chunk / "results.jsonl"
    while not written.exists() or written.read_bytes().count(b"\n") < 10:
        assert time.monotonic() < deadline, client.task(chunk)
        time.sleep(0.02)
    # The parent's progress counts the rows its running chunk has done, not only finished chunks' rows.
    # (The chunk's progress reaches Redis a moment after its lines reach the file.)
    while not ((progress := client.task(parent).get("progress") or {}).get("step") or 0) >= 1:
        assert time.monotonic() < deadline, client.task(parent)
        time.sleep(0.05)
    assert progress["unit"] == "rows", progress
    assert progress["message"] == f"{progress['step']:,} rows done in 1 running chunk(s)", progress
    first = client.task(chunk)["worker_id"]
    cluster.worker_procs[first].kill()  # SIGKILL: its executor dies with it, mid-batch or between two
    finished_before = written.read_bytes().count(b"\n")
    assert finished_before < rows, "the chunk ended before its worker was killed; give it more rows"

    record = client.wait(parent, timeout=300)
    assert record["state"] == "succeeded", record
    again = client.task(chunk)
    assert (again["requeues"], again["worker_id"] != first) == (1, True), again
    kept = client.result(chunk)["kept_rows"]
    assert finished_before <= kept < rows
    said = [line["text"] for line in client.logs(chunk)["lines"]]
    assert f"{kept:,} rows kept from an earlier run, not generated again" in said, said
    # The parent's log tells both starts: the lost one and the one that finished.
    told = [e["text"] for e in client.logs(parent)["lines"] if e["event"] == "chunk_started"]
    assert told == [
        f"chunk 0 ({chunk[:8]}) started on {first}: rows 1-600",
        f"chunk 0 ({chunk[:8]}) started again on {again['worker_id']}: rows 1-600",
    ], told
    lines = lines_of(client, parent)
    assert [line["id"] for line in lines] == [f"q{i:03d}" for i in range(rows)]
    assert all(line["error"] is None and line["output"] for line in lines)
    # The lost worker never recorded the usage of the rows it finished; the run that kept them counts
    # them, so the owner's usage holds every row's tokens once.
    assert f"{kept:,} of them came from a run whose worker was lost before it recorded their usage: counted now" in said
    owner = record["owner"]
    totals = client.stats(user=owner, group_by="total")["users"][0]["totals"]
    assert totals["completion_tokens"] == sum(line["completion_tokens"] for line in lines), totals
    assert totals["prompt_tokens"] == sum(line["prompt_tokens"] for line in lines), totals


@pytest.mark.extra("inference")
def test_a_cancelled_dataset_task_says_how_to_resume_and_where_its_lines_are(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = write_rows(tmp_path / "questions.jsonl", [f"Question: what is {i} plus one?\nAnswer:" for i in range(200)])
    cluster = make_cluster(1)
    client = client_for(cluster)
    body = task(data, chunk_rows=400)
    body["spec"]["inference"] |= {"batch_size": 2, "max_tokens": 8}
    parent = client.submit(body)["task_id"]
    deadline = time.monotonic() + 120
    while client.task(parent)["state"] != "running":
        assert time.monotonic() < deadline, client.task(parent)
        time.sleep(0.05)
    env = {"MLOC_API_URL": cluster.api_url}
    assert mloc("cancel", parent, env=env).returncode == 0
    record = client.wait(parent, timeout=120)
    assert record["state"] == "cancelled", record
    assert record["reason"].endswith(
        f"; `mloc resume {parent}` runs the chunks not finished and the rest of the data"
    ), record["reason"]
    said = client.logs(parent)["lines"]
    assert said[0]["text"].startswith(f"chunk 0 ({record['children'][0][:8]}) started on local-1: rows 1-400"), said
    # The running chunk stopped with it, and says why: with its dataset task, not "on request".
    chunk = client.wait(record["children"][0], timeout=60)
    assert chunk["state"] == "cancelled" and chunk["reason"].startswith(
        f"its dataset task {parent} was cancelled by "
    ), chunk["reason"]
    # The task's log tells that chunk's end too, though the task had ended first.
    deadline = time.monotonic() + 30
    while not any(e["event"] == "chunk_cancelled" for e in client.logs(parent)["lines"]):
        assert time.monotonic() < deadline, client.logs(parent)["lines"]
        time.sleep(0.1)
    told = next(e for e in client.logs(parent)["lines"] if e["event"] == "chunk_cancelled")
    assert told["text"].startswith(f"chunk 0 ({chunk['task_id'][:8]}) cancelled on local-1: its dataset task"), told
    # Its own end line (a chunk that stops after it may be told after it).
    ended = next(e for e in said if e["event"] == "cancelled")
    assert f"mloc resume {parent}" in ended["text"], said
    # It has no files of its own; the command names what it does have.
    files = mloc("artifacts", parent, env=env)
    assert files.returncode != 0
    assert f"task {parent} has no files: it is cancelled, and a dataset task has files" in files.stderr, files.stderr
    assert "RESULTS_DIR" not in files.stderr and f"mloc results {parent}" in files.stderr
    result = mloc("result", parent, env=env)
    assert f"has no result (it is cancelled); the lines its chunks finished: mloc results {parent}" in result.stderr


@pytest.mark.extra("inference")
def test_a_chunk_run_without_the_artifact_store_is_read_from_a_shared_results_dir_or_fails_the_task(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    prompts = [f"Question: what is {i} plus one?\nAnswer:" for i in range(8)]
    data = write_rows(tmp_path / "questions.jsonl", prompts)
    cluster = make_cluster(0, env={"MLOC_ARTIFACT_STORE": f"file://{tmp_path / 'store'}"})
    client = client_for(cluster)
    # A worker started without the store, writing to the RESULTS_DIR the orchestrator reads (one host).
    cluster.add_worker("no-store", {"MLOC_ARTIFACT_STORE": ""})
    cluster.wait_ready(60)
    # Its record and `mloc workers` say so before any task needs its files.
    store = f"file://{tmp_path / 'store'}"
    assert client.worker("no-store")["artifact_store"] == ""
    assert client.worker("no-store")["warning"] == (
        f"it publishes no results (no MLOC_ARTIFACT_STORE), but this orchestrator reads {store}: its tasks' files are "
        "served only if the two share a disk; set the same MLOC_ARTIFACT_STORE on every worker and the orchestrator"
    )
    listed = mloc("workers", env={"MLOC_API_URL": cluster.api_url})
    assert "warning: worker no-store: it publishes no results (no MLOC_ARTIFACT_STORE)" in listed.stderr, listed.stderr
    record = client.wait(client.submit(task(data, chunk_rows=5))["task_id"], timeout=300)
    assert record["state"] == "succeeded", record
    assert [line["id"] for line in lines_of(client, record["task_id"])] == [f"q{i:03d}" for i in range(8)]
    # A running chunk's lines so far are served from that folder too (it publishes to the store at its end).
    many = write_rows(tmp_path / "many.jsonl", [f"Question: what is {i} plus one?\nAnswer:" for i in range(200)])
    body = task(many, chunk_rows=200)
    body["spec"]["inference"] |= {"batch_size": 2, "max_tokens": 8}
    parent = client.submit(body)["task_id"]
    deadline = time.monotonic() + 120
    seen: list[dict[str, Any]] = []
    while not 0 < len(seen) < 200:
        assert time.monotonic() < deadline and client.task(parent)["state"] != "succeeded", client.task(parent)
        time.sleep(0.05)
        with contextlib.suppress(ApiError):  # none before its chunk has written any
            seen = lines_of(client, parent)
    assert [line["id"] for line in seen] == [f"q{i:03d}" for i in range(len(seen))]
    assert client.wait(parent, timeout=300)["state"] == "succeeded"

    # One writing to a disk of its own: the task fails at once, saying why and what to set.
    cluster.stop_worker("no-store")
    cluster.add_worker("elsewhere", {"MLOC_ARTIFACT_STORE": "", "RESULTS_DIR": str(tmp_path / "elsewhere")})
    cluster.wait_ready(60)
    record = client.wait(client.submit(task(data, chunk_rows=5))["task_id"], timeout=300)
    assert record["state"] == "failed", record
    first = record["children"][0]
    assert record["reason"].startswith(
        f"the result lines of chunk 0 cannot be read: task {first} has no published artifacts (it is succeeded)"
    ), record["reason"]
    assert "worker elsewhere may run without MLOC_ARTIFACT_STORE: set it on every worker" in record["reason"]
    assert record["reason"].endswith("then submit the task again") and "mloc resume" not in record["reason"]
