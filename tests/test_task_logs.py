"""A task's log as a person reads it: MLOC's lifecycle lines, the executor's own lines and captured
library output told apart by source; filtered by source, count and time; followed to the task's end
with an exit code that says how it ended; and a follower that loses the orchestrator says so in one
line. Real Redis, real orchestrator and worker processes, the real `mloc` command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from mloc import tasklog
from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.tasklog import Since
from mloc.worker.capture import END_OF_TASK, Lines
from mloc.worker.reporter import Reporter
from tests.support.api import wait_until
from tests.support.cli import REPO, mloc
from tests.support.tiny_model import build_tiny_causal_lm

ENDED = ("succeeded", "failed", "cancelled")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d"  # local time and its UTC offset


def echo(retries: int = 0, **hyperparameters: Any) -> str:
    options = ", ".join(f"{name}: {value!r}" for name, value in hyperparameters.items())
    return f"taskType: echo\nretries: {retries}\nhyperparameters: {{{options}}}\n"


def ended(client: Client, task_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(client, task_id, lambda record: record["state"] in ENDED, timeout)


def events(lines: list[dict[str, Any]]) -> list[str]:
    return [line["event"] for line in lines if "event" in line]


def write_through_reporter(redis_url: str, task_id: str, entries: list[dict[str, Any]]) -> None:
    """Append log entries as the worker writes an executor's (its Reporter), with chosen times."""

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            reporter = Reporter(client, task_id, time.time())
            for entry in entries:
                reporter.handle({"ev": "log", **entry})
            await reporter.close()
        finally:
            await client.aclose()

    asyncio.run(write())


# ------------------------------------------------------------ without a cluster
def test_captured_output_is_sorted_into_library_lines_and_lines_of_unknown_origin() -> None:
    err = Lines("stderr")
    data = (
        b"INFO 05-09 07:35:25 [config.py:12] Using max model len 2048\n"
        b"(EngineCore_DP0 pid=4242) WARNING 05-09 07:35:26 [cpu.py:80] no CUDA\n"
        b"/venv/site-packages/torch/nn/x.py:12: UserWarning: deprecated\n"
        b"  warnings.warn(\n"
        b"\x1b[32mmy own line\x1b[0m\n"
        b"\r  0%|          | 0/4 [00:00<?, ?it/s]\r 50%|#####     | 2/4\r100%|##########| 4/4 [00:01<00:00]\n"
        b"Traceback (most recent call last):\n"
        b'  File "x.py", line 1, in <module>\n'
        b"ValueError: boom\n"
        b"W0509 07:35:25.123456 1234 glog.cc:12] from C++\n"
        b"unfinished"
    )
    sorted_lines = err.feed(data, now=0.0) + err.feed(f"\n{END_OF_TASK}\n".encode(), now=1.0)
    assert [(c.level, c.source, c.text) for c in sorted_lines] == [
        ("INFO", "library", "INFO 05-09 07:35:25 [config.py:12] Using max model len 2048"),
        ("WARNING", "library", "(EngineCore_DP0 pid=4242) WARNING 05-09 07:35:26 [cpu.py:80] no CUDA"),
        ("WARNING", "library", "/venv/site-packages/torch/nn/x.py:12: UserWarning: deprecated"),
        ("WARNING", "library", "  warnings.warn("),
        ("INFO", "stderr", "my own line"),
        ("INFO", "library", "100%|##########| 4/4 [00:01<00:00]"),  # a redrawn bar: its last state
        ("ERROR", "stderr", "Traceback (most recent call last):"),
        ("ERROR", "stderr", '  File "x.py", line 1, in <module>'),
        ("ERROR", "stderr", "ValueError: boom"),
        ("WARNING", "library", "W0509 07:35:25.123456 1234 glog.cc:12] from C++"),
        ("INFO", "stderr", "unfinished"),
    ]
    assert err.tasks_ended == 1
    # A bar that runs for a while shows up every 10 s, not at every redraw.
    out = Lines("stdout")
    shown = [c.text for second in range(25) for c in out.feed(f"\r{second * 4}%|".encode(), now=float(second))]
    assert shown == ["40%|", "80%|"]  # each state is complete when the next redraw begins
    assert [c.text for c in out.feed(b"\r100%|\n", now=25.0)] == ["100%|"]


def test_since_takes_durations_times_and_entry_ids_and_names_the_forms_otherwise() -> None:
    now = 1_800_000_000.0
    assert tasklog.parse_since("10m", now) == Since(ts=now - 600)
    assert tasklog.parse_since("1h30m", now) == Since(ts=now - 5400)
    assert tasklog.parse_since("1715240000.5", now) == Since(ts=1715240000.5)
    assert tasklog.parse_since("2026-05-09T07:35:00Z", now) == Since(
        ts=datetime(2026, 5, 9, 7, 35, tzinfo=UTC).timestamp()
    )
    assert tasklog.parse_since("2026-05-09T07:35:00", now).ts == datetime(2026, 5, 9, 7, 35, tzinfo=UTC).timestamp()
    assert tasklog.parse_since("1715240000000-3", now) == Since(after_id="1715240000000-3")
    assert tasklog.parse_since("0", now) == Since()
    for bad in ("90", "ten minutes", "10x"):
        with pytest.raises(ValueError, match=r"is not a time; give a duration ago \(30s, 10m"):
            tasklog.parse_since(bad, now)
    with pytest.raises(ValueError, match="unknown log source noise; the sources are mloc, executor, library"):
        tasklog.parse_sources("mloc,noise")


# ------------------------------------------------------------------ lifecycle
def test_a_task_log_tells_its_life_in_order_and_a_task_that_fails_at_once_says_why(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)

    # Inline, on the worker's loop, and in an executor process: the same story.
    ids = [client.submit(body)["task_id"] for body in (echo(sleep_sec=0.4, steps=2), echo(), echo(isolate=True))]
    for task_id in ids:
        assert ended(client, task_id)["state"] == "succeeded"
        lines = client.logs(task_id)["lines"]
        assert events(lines) == ["assigned", "started", "succeeded"], lines
        lifecycle = [line for line in lines if "event" in line]
        assert [line["text"] for line in lifecycle[:2]] == ["assigned to local-1", "started on local-1 (run 1)"]
        assert re.fullmatch(r"succeeded in \d+\.\d s", lifecycle[2]["text"])
        assert {(line["source"], line["level"]) for line in lifecycle} == {("mloc", "INFO")}
        stamps = [line["ts"] for line in lines]
        assert stamps == sorted(stamps)
    steps = [line for line in client.logs(ids[0])["lines"] if "event" not in line]
    assert [(line["source"], line["text"]) for line in steps] == [("executor", "step 1/2"), ("executor", "step 2/2")]

    # A plug-in in an executor process: its prints, its logger, a library's logger, a library's own
    # output, each with its source, all in before the line that says how the task ended.
    chatty = client.submit("taskType: seed_one_echo\nhyperparameters: {chatter: true}\n")["task_id"]
    assert ended(client, chatty)["state"] == "succeeded"
    lines = client.logs(chatty)["lines"]
    assert events(lines) == ["assigned", "started", "succeeded"] and lines[-1]["event"] == "succeeded"
    assert {(line["source"], line["level"], line["text"]) for line in lines if "event" not in line} == {
        ("stdout", "INFO", "hello from seed_one_echo"),
        ("executor", "WARNING", "a warning of the plug-in's own"),
        ("library", "WARNING", "urllib3.connectionpool: Retrying (Retry(total=4)) after connection broken"),
        ("library", "INFO", "INFO 05-09 07:35:25 [loader.py:12] Loading weights took 0.52 seconds"),
    }
    quiet = client.logs(chatty, source="mloc,executor")["lines"]
    assert [line["text"] for line in quiet if "event" not in line] == ["a warning of the plug-in's own"]

    # Failed at once, in an executor process: the reason is in the log.
    failing = client.submit(echo(isolate=True, fail_message="model /models/x does not exist"))["task_id"]
    assert ended(client, failing)["state"] == "failed"
    lines = client.logs(failing)["lines"]
    assert events(lines) == ["assigned", "started", "failed"]
    assert lines[-1]["level"] == "ERROR" and lines[-1]["source"] == "mloc"
    assert re.fullmatch(r"failed in \d+\.\d s: model /models/x does not exist", lines[-1]["text"])

    # A crash is retried, then gives up: each step is in the log.
    crashing = client.submit(echo(retries=1, isolate=True, crash=True))["task_id"]
    record = ended(client, crashing)
    assert record["state"] == "failed"
    lines = client.logs(crashing)["lines"]
    assert events(lines) == ["assigned", "started", "requeued", "assigned", "started", "failed"]
    requeued = next(line for line in lines if line.get("event") == "requeued")
    assert requeued["level"] == "WARNING" and requeued["text"].startswith(
        "requeued after the executor process died from SIGKILL"
    )
    assert "(1 of 2 attempts used); retry in " in requeued["text"]
    assert lines[-1]["text"] == f"failed: {record['reason']}" and "started on local-1 (run 2)" in lines[-2]["text"]

    # Cancelled while waiting, and while running.
    waiting = client.submit("taskType: echo\nresources: {tags: [nowhere]}\n")["task_id"]
    client.cancel(waiting)
    assert [(line["event"], line["text"]) for line in client.logs(waiting)["lines"]] == [
        ("cancelled", "cancelled by admin")
    ]
    running = client.submit(echo(sleep_sec=30, steps=60))["task_id"]
    wait_until(client, running, lambda record: record["state"] == "running")
    client.cancel(running)
    assert ended(client, running)["state"] == "cancelled"
    lines = client.logs(running, source="mloc")["lines"]
    assert events(lines) == ["assigned", "started", "cancel_requested", "cancelled"]
    assert lines[2]["text"].startswith("cancel requested by admin") and lines[3]["text"] == "cancelled on request"


# -------------------------------------------------------------------- filters
def test_source_tail_and_since_filter_exactly_in_the_api_and_the_cli(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], redis_url: str
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit("taskType: echo\npayload: {n: 1}\n")["task_id"]
    ended(client, task_id)
    # Six lines a minute from now, a second apart, from three sources; then one written an hour ago.
    base = float(int(time.time()) + 60)
    sources = ["library", "stdout", "executor"] * 2
    written = [{"ts": base + n, "source": source, "message": f"line {n}"} for n, source in enumerate(sources, 1)]
    written.append({"ts": time.time() - 3600, "source": "stderr", "message": "an hour ago", "level": "WARNING"})
    write_through_reporter(redis_url, task_id, written)

    def texts(**params: Any) -> list[str]:
        return [line["text"] for line in client.logs(task_id, **params)["lines"]]

    everything = client.logs(task_id)["lines"]
    assert [line["text"] for line in everything[3:]] == [*(f"line {n}" for n in range(1, 7)), "an hour ago"]
    assert [line.get("event") for line in client.logs(task_id, source="mloc")["lines"]] == [
        "assigned",
        "started",
        "succeeded",
    ]
    assert texts(source="library,stdout") == ["line 1", "line 2", "line 4", "line 5"]
    assert texts(source=["executor", "stderr"]) == ["line 3", "line 6", "an hour ago"]
    assert texts(tail=2) == ["line 6", "an hour ago"]
    assert texts(source="library", tail=1) == ["line 4"]
    assert texts(since=base + 4) == ["line 4", "line 5", "line 6"]
    assert texts(since=datetime.fromtimestamp(base + 4.5, UTC).isoformat()) == ["line 5", "line 6"]
    assert texts(since=base + 2, tail=2) == ["line 5", "line 6"]
    assert texts(since="10m") == [line["text"] for line in everything[:-1]]  # by its time, not its place
    page = client.logs(task_id, limit=4)
    assert len(page["lines"]) == 4 and page["more"] is True
    rest = client.logs(task_id, since=page["next"])["lines"]
    assert [line["id"] for line in page["lines"] + rest] == [line["id"] for line in everything]
    # The next page of a time window keeps the window: `after` reads on, `since` still filters.
    first = client.logs(task_id, since="10m", limit=2)
    window = first["lines"] + client.logs(task_id, since="10m", after=first["next"])["lines"]
    assert [line["text"] for line in window] == [line["text"] for line in everything[:-1]]

    with httpx.Client(base_url=cluster.api_url) as http:
        bad_since = http.get(f"/api/v1/tasks/{task_id}/logs", params={"since": "yesterdayish"})
        assert bad_since.status_code == 400
        assert "since='yesterdayish' is not a time; give a duration ago (30s, 10m" in bad_since.json()["message"]
        bad_source = http.get(f"/api/v1/tasks/{task_id}/logs", params={"source": "vllm"})
        assert bad_source.status_code == 400
        assert bad_source.json()["message"] == (
            "unknown log source vllm; the sources are mloc, executor, library, stdout, stderr (comma-separated)"
        )

    env = {"MLOC_API_URL": cluster.api_url}
    shown = mloc("logs", task_id, env=env).stdout.splitlines()
    assert re.fullmatch(rf"{STAMP} INFO    mloc     assigned to local-1", shown[0]), shown
    local_time = datetime.fromtimestamp(base + 1).astimezone().isoformat(" ", "seconds")
    assert shown[3] == f"{local_time} INFO    library  line 1"
    assert re.fullmatch(rf"{STAMP} WARNING stderr   an hour ago", shown[-1])
    assert [
        line.rsplit(" ", 2)[-2:]
        for line in mloc(
            "logs", task_id[:8], "--source", "library", "-s", "executor", "--tail", "3", env=env
        ).stdout.splitlines()
    ] == [
        ["line", "3"],
        ["line", "4"],
        ["line", "6"],
    ]
    local = f"{datetime.fromtimestamp(base + 5):%Y-%m-%d %H:%M:%S}"
    assert [line[-6:] for line in mloc("logs", task_id, "--since", local, env=env).stdout.splitlines()] == [
        "line 5",
        "line 6",
    ]
    assert mloc("logs", task_id, "--since", "10m", "--source", "stderr", env=env).stdout == ""
    wrong = mloc("logs", task_id, "--since", "soonish", env=env)
    assert wrong.returncode == 2 and "'soonish' is not a time; give a duration ago (30s, 10m, 2h, 1d)" in wrong.stderr

    # A log longer than the API's page is printed whole: the CLI reads every page.
    write_through_reporter(redis_url, task_id, [{"ts": base + 10, "message": f"more {n}"} for n in range(2500)])
    assert client.logs(task_id)["more"] is True
    printed = mloc("logs", task_id, env=env).stdout.splitlines()
    assert len(printed) == len(everything) + 2500 and printed[-1].endswith("more 2499"), printed[-3:]
    as_json = json.loads(mloc("logs", task_id, "--json", "--since", "10m", env=env).stdout)
    assert len(as_json["lines"]) == len(everything) - 1 + 2500 and as_json["more"] is False


# ---------------------------------------------------------------------- follow
def test_follow_ends_with_the_final_state_and_exits_by_it(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    env = {"MLOC_API_URL": cluster.api_url}

    good = client.submit(echo(sleep_sec=1.5, steps=3))["task_id"]
    followed = mloc("logs", "-f", good, env=env)
    assert followed.returncode == 0, followed.stderr
    shown = followed.stdout.splitlines()
    assert [line.split(None, 4)[-1] for line in shown] == [
        "assigned to local-1",
        "started on local-1 (run 1)",
        "step 1/3",
        "step 2/3",
        "step 3/3",
        shown[-1].split(None, 4)[-1],
    ]
    assert re.search(r"mloc +succeeded in \d", shown[-1])
    assert followed.stderr.strip() == f"task {good} ended: succeeded"

    bad = client.submit(echo(sleep_sec=1, steps=2, fail_message="the dataset is empty"))["task_id"]
    followed = mloc("logs", "-f", "--source", "mloc", bad, env=env)
    assert followed.returncode == 1
    assert [line.split(None, 4)[-1] for line in followed.stdout.splitlines()] == [
        "assigned to local-1",
        "started on local-1 (run 1)",
        followed.stdout.splitlines()[-1].split(None, 4)[-1],
    ]
    assert re.search(r"ERROR +mloc +failed in \d+\.\d s: the dataset is empty$", followed.stdout.splitlines()[-1])
    assert followed.stderr.strip() == f"task {bad} ended: failed (the dataset is empty)"

    # A task that ended a while ago: its last line, then its end.
    again = mloc("logs", "-f", "--tail", "1", good, "--json", env=env)
    assert again.returncode == 0
    *entries, end = [line for line in again.stdout.splitlines() if line]
    assert len(entries) == 1 and '"event": "succeeded"' in entries[0]
    assert end == '{"end": true, "state": "succeeded", "reason": ""}'


def test_a_follower_that_loses_the_orchestrator_says_so_in_one_line_and_fails(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit(echo(sleep_sec=60, steps=60))["task_id"]
    wait_until(client, task_id, lambda record: record["state"] == "running")
    task_file = tmp_path / "long.yaml"
    task_file.write_text(echo(sleep_sec=60, steps=60))
    env = {"MLOC_API_URL": cluster.api_url, "COLUMNS": "200"}
    command = [sys.executable, "-m", "mloc.cli"]
    follower = subprocess.Popen(
        [*command, "logs", "-f", task_id], cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    waiter = subprocess.Popen(
        [*command, "submit", str(task_file), "--wait"],
        cwd=REPO,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None and waiter.stdout is not None
        assert "assigned to local-1" in follower.stdout.readline().decode()
        submitted = waiter.stdout.readline().decode()
        assert submitted.startswith("submitted "), submitted
        waited_id = submitted.split()[1]
        wait_until(client, waited_id, lambda record: record["state"] == "running")
        assert cluster.orchestrator is not None
        cluster.orchestrator.kill()
        cluster.orchestrator.wait(10)
        for process, followed_id in ((follower, task_id), (waiter, waited_id)):
            _, err = process.communicate(timeout=30)
            assert process.returncode == 3, err
            assert err.decode().splitlines() == [
                f"error: lost the orchestrator at {cluster.api_url}; the task goes on — follow it again with "
                f"`mloc logs -f {followed_id}`"
            ]
    finally:
        for process in (follower, waiter):
            if process.poll() is None:
                process.kill()
                process.wait()


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


# -------------------------------------------------------------------- training
@pytest.mark.extra("train")
def test_an_sft_run_logs_a_loss_line_at_each_logging_step(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    model = build_tiny_causal_lm(tmp_path / "tiny")
    cluster = make_cluster(1)
    client = client_for(cluster)
    task = (
        (REPO / "templates" / "sft_tiny_local.yaml")
        .read_text()
        .replace("/tmp/tiny-llama", str(model))
        .replace("max_steps: 30", "max_steps: 8")
        .replace("logging_steps: 5", "logging_steps: 2")
    )
    task_id = client.submit(task.encode())["task_id"]
    assert ended(client, task_id, timeout=600)["state"] == "succeeded"
    lines = client.logs(task_id)["lines"]
    losses = [line for line in lines if re.match(r"step \d+/8: loss ", line["text"])]
    steps = [int(line["text"].split(":")[0].split()[1].split("/")[0]) for line in losses]
    # One line per logging step (the trainer also logs the first step), the numbers the metrics hold.
    metrics = client.metrics(task_id)["metrics"]
    assert steps == [row["step"] for row in metrics if "loss" in row] and {2, 4, 6, 8} <= set(steps), lines
    for line in losses:
        assert line["source"] == "executor" and line["level"] == "INFO"
        assert re.fullmatch(
            r"step \d/8: loss [\d.]+, learning_rate [\d.e-]+, grad_norm [\d.e-]+, epoch [\d.]+.*", line["text"]
        )
    assert any(line["text"].startswith("training finished: ") and "train_loss" in line["text"] for line in lines)
    assert events(lines) == ["assigned", "started", "succeeded"]
