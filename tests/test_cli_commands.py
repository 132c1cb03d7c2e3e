"""What the everyday commands say: `show` as a summary, `submit --wait` following a task (progress, a task
no worker can run, Ctrl-C), bulk submits, `workers` aging out and removing stopped workers, folders
fetched from a task's artifacts, and `stats` over relative dates."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis
import typer

from mloc import keys
from mloc.cli.stats import parse_day
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.api import wait_until
from tests.support.cli import REPO, mloc

SLEEPER = {"taskType": "echo", "hyperparameters": {"sleep_sec": 8, "steps": 8}}


def test_show_submit_wait_and_bulk_say_what_a_task_is_doing(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)

    # --wait in a pipe: a line per change, progress with count and ETA, then the result.
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"taskType": "echo", "hyperparameters": {"sleep_sec": 3, "steps": 3}}))
    waited = mloc("submit", str(slow), "--wait", env=env)
    assert waited.returncode == 0, waited.stderr
    lines = waited.stdout.splitlines()
    assert re.match(r"^submitted [0-9a-f-]{36} \(.*slow\.json\), assigned to local-1$", lines[0])
    assert any(re.match(r"^running on local-1: [123]/3 \(\d+\.\d%\)(, ETA .+)?$", line) for line in lines), lines
    assert any(re.match(r"^task [0-9a-f-]{36} succeeded$", line) for line in lines), lines

    # --dry-run: what would happen, in words; --json: the whole answer.
    dry = mloc("submit", str(slow), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == [
        f"valid: {slow}: EchoTask (echo), topic tasks.echo",
        "  would be placed on: local-1",
    ], dry.stdout
    as_json = json.loads(mloc("submit", str(slow), "--dry-run", "--json", env=env).stdout)
    assert as_json["valid"] is True and as_json["would_place_on"] == ["local-1"]
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"taskType": "echo", "resources": {"hardware": {"gpu": {"count": 1}}}}))
    never = mloc("submit", str(gpu), "--dry-run", env=env)
    assert never.returncode == 1, never.stdout + never.stderr  # a script can tell
    assert never.stdout.splitlines()[1].startswith("  could never start: "), never.stdout

    # show: a readable summary of a running task, with progress, ETA and times.
    running = client.submit(SLEEPER)["task_id"]
    wait_until(client, running, lambda r: bool(r["state"] == "running" and (r.get("progress") or {}).get("step")))
    summary = mloc("show", running[:8], env=env).stdout
    fields = dict(line.split(None, 1) for line in summary.splitlines())
    assert fields["task"] == running and fields["state"] == "running on local-1"
    assert re.fullmatch(r"\d/8 \(\d+\.\d%\), ETA .+", fields["progress"]), fields
    assert fields["attempts"] == "1 of 3" and fields["worker"] == "local-1"
    local_time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d"  # with its UTC offset
    assert re.fullmatch(rf"{local_time} \((just now|\d+ s ago)\)", fields["created"]), fields
    assert fields["ran"].endswith(" so far") and fields["logs"] == f"mloc logs {running}"

    # Ctrl-C while waiting: the task goes on, and the message says how to follow it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mloc.cli", "submit", str(slow), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "submitted ID ..."
    task_id = first.split()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (first, out, err)
    assert f"stopped waiting; task {task_id} goes on" in err and f"mloc logs -f {task_id}" in err
    assert client.wait(task_id, timeout=60)["state"] == "succeeded"

    # A task no worker can ever run: --wait gives up after --wait-timeout, saying why; it stays queued.
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"taskType": "echo", "resources": {"hardware": {"gpu": {"count": 2}}}}))
    started = time.monotonic()
    hopeless = mloc("submit", str(gpu), "--wait", "--wait-timeout", "1", env=env)
    assert hopeless.returncode == 1 and time.monotonic() - started < 60
    assert re.search(r"error: task (\S+) cannot start: no registered worker can run this task: .*GPU", hopeless.stderr)
    queued = re.search(r"^submitted (\S+)", hopeless.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert client.task(queued)["state"] == "pending"
    waiting = dict(line.split(None, 1) for line in mloc("show", queued, env=env).stdout.splitlines())
    assert waiting["waiting"].startswith("cannot start: no registered worker can run this task")

    # Several files and multi-document files go in one request; an invalid one is named, and nothing stored.
    before = client.tasks(page_size=100)["total"]
    two = tmp_path / "two.yaml"
    two.write_text("taskType: echo\npayload: 1\n---\ntaskType: echo\npayload: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskType: echo\n---\ntaskType: echo\nhyperparameters: {sleeep_sec: 1}\n")
    refused = mloc("submit", str(two), str(bad), env=env)
    assert refused.returncode == 2
    assert "1 of 4 tasks are invalid; nothing was stored" in refused.stderr
    assert f"{bad} (document 2): spec.hyperparameters.sleeep_sec" in refused.stderr
    assert client.tasks(page_size=100)["total"] == before
    accepted = mloc("submit", str(two), str(slow), env=env)
    assert accepted.returncode == 0, accepted.stderr
    said = accepted.stdout.splitlines()
    assert [re.sub(r"[0-9a-f-]{36}", "ID", line).split(",")[0] for line in said] == [
        f"submitted ID ({two} (document 1))",
        f"submitted ID ({two} (document 2))",
        f"submitted ID ({slow})",
    ]
    assert client.tasks(page_size=100)["total"] == before + 3
    # A pipeline's steps are told by their names.
    steps = tmp_path / "steps.yaml"
    step = {"apiVersion": "mloc/v1", "kind": "EchoTask", "spec": {"taskType": "echo"}}
    steps.write_text(
        json.dumps(step | {"metadata": {"name": "first"}})
        + "\n---\n"
        + json.dumps(step | {"metadata": {"name": "then"}, "spec": {"taskType": "echo", "dependsOn": ["first"]}})
    )
    named = mloc("submit", str(steps), env=env)
    assert named.returncode == 0, named.stderr
    assert [re.sub(r"[0-9a-f-]{36}", "ID", line).split(",")[0] for line in named.stdout.splitlines()] == [
        f"submitted ID ({steps} (document 1: first))",
        f"submitted ID ({steps} (document 2: then))",
        "pipeline ID: `mloc pipeline ID` shows its steps",
    ], named.stdout
    # --wait follows several tasks in turn, each reported as it ends; a step that fails fails the command
    # once every task has ended, and a step after it is ended by it.
    chain = tmp_path / "chain.yaml"
    chain.write_text(
        "\n---\n".join(
            json.dumps({"apiVersion": "mloc/v1", "kind": "EchoTask", "metadata": {"name": name}, "spec": spec})
            for name, spec in (
                ("prepare", {"taskType": "echo", "payload": "ready", "hyperparameters": {"sleep_sec": 1}}),
                ("check", {"taskType": "echo", "dependsOn": ["prepare"], "hyperparameters": {"fail_message": "no"}}),
                ("publish", {"taskType": "echo", "dependsOn": ["check"]}),
            )
        )
    )
    followed = mloc("submit", str(chain), "--wait", env=env)
    assert followed.returncode == 1, followed.stderr
    ids = re.findall(r"^submitted (\S+)", followed.stdout, re.M)
    assert len(ids) == 3 and [client.task(i)["state"] for i in ids] == ["succeeded", "failed", "failed"]
    for number, task_id in enumerate(ids, 1):
        assert f"[{number}/3] waiting for {task_id}" in followed.stdout
    ends = re.findall(r"^task (\S+) (succeeded|failed)", followed.stdout, re.M)
    assert ends == [(ids[0], "succeeded"), (ids[1], "failed"), (ids[2], "failed")], followed.stdout
    assert "ready" in followed.stdout and followed.stderr.strip().endswith("2 of 3 tasks did not succeed")


def test_show_says_when_the_worker_running_a_task_has_gone_silent(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, env={"HEARTBEAT_INTERVAL_SEC": "0.5", "HEARTBEAT_TTL_SEC": "30"})
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    task_id = client.submit(b"taskType: echo\nhyperparameters: {sleep_sec: 60}\n")["task_id"]
    wait_until(client, task_id, lambda record: record["state"] == "running")
    healthy = mloc("show", task_id, env=env)
    assert re.search(r"^worker +local-1$", healthy.stdout, re.M), healthy.stdout + healthy.stderr
    worker = cluster.worker_procs["local-1"]
    worker.send_signal(signal.SIGSTOP)  # hung, as a machine that froze: nothing it says arrives
    try:
        time.sleep(16)
        silent = mloc("show", task_id, env=env)
    finally:
        worker.send_signal(signal.SIGCONT)
    said = re.search(
        r"^worker +local-1 \(no heartbeat for (\d+)s: it may be down; if none comes within 30s of the last, "
        r"it is declared lost and the task goes back to the queue\)$",
        silent.stdout,
        re.M,
    )
    # 16 s or more: as many more as `mloc show` took to start on a busy machine.
    assert said is not None and 16 <= int(said.group(1)) < 30, silent.stdout + silent.stderr
    assert re.search(r"^state +running on local-1$", silent.stdout, re.M), silent.stdout
    client.cancel(task_id)


def test_workers_show_memory_and_gpus_age_out_when_stopped_and_can_be_removed(
    make_cluster: Callable[..., LocalCluster], sync_redis: redis.Redis
) -> None:
    cluster = make_cluster(
        2,
        env={"ORCHESTRATOR_TOKEN": "fleet-admin"},
        worker_env=[
            {"MLOC_WORKER_GPUS": "NVIDIA L4:2:23034", "MLOC_WORKER_MEMORY": "16Gi", "WORKER_TAGS": "l4,eu"},
            {},
        ],
    )
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "fleet-admin"}
    listed = mloc("workers", env=env).stdout
    [header] = [re.split(r"\s{2,}", line.strip()) for line in listed.splitlines() if line.lstrip().startswith("ID")]
    assert header == [
        "ID",
        "STATUS",
        "TOPICS",
        "TAGS",
        "CPU",
        "MEMORY",
        "GPUS",
        "SLOTS",
        "RUNNING",
        "WARM MODELS",
        "HEARTBEAT",
    ]
    [row] = [line for line in listed.splitlines() if line.lstrip().startswith("local-1 ")]
    assert "16.0/16.0 GiB" in row and "2/2 NVIDIA L4" in row and "active" in row and " eu,l4 " in row
    assert mloc("cleanup", env=env).stdout.strip() == "no silent worker found"

    refused = mloc("workers", "remove", "local-1", env=env)
    assert refused.returncode == 2 and "worker local-1 is active; only an offline or lost worker can be removed" in (
        refused.stderr
    )

    cluster.stop_worker("local-2")
    wait_for = time.monotonic() + 30
    while sync_redis.hget(keys.worker("local-2"), "status") != "offline":
        assert time.monotonic() < wait_for
        time.sleep(0.1)
    # Just stopped: still listed, so a fresh loss is seen.
    assert "local-2" in mloc("workers", "-q", env=env).stdout.split()
    # Silent for an hour: left out of the listing unless --all.
    sync_redis.hset(keys.worker("local-2"), "last_heartbeat", repr(time.time() - 3600))
    sync_redis.hset(keys.worker("local-2"), "status", "active")  # as if it had died without a word
    sync_redis.zadd(keys.WORKERS, {"local-2": time.time() - 3600})
    # The orchestrator's own reaper may mark it first.
    assert mloc("cleanup", env=env).stdout.strip() in ("1 worker(s) marked lost (local-2)", "no silent worker found")
    assert sync_redis.hget(keys.worker("local-2"), "status") == "lost"
    default = mloc("workers", env=env).stdout
    assert "local-2" not in default and "1 offline or lost worker(s) not shown: --all shows them" in default
    assert mloc("workers", "--all", "-q", env=env).stdout.split() == ["local-1", "local-2"]

    user = Client(cluster.api_url, "fleet-admin").add_user("frank")["token"]
    forbidden = mloc("workers", "remove", "local-2", env={**env, "ORCHESTRATOR_TOKEN": "", "MLOC_TOKEN": user})
    assert forbidden.returncode == 2 and "for the admin" in forbidden.stderr
    removed = mloc("workers", "remove", "local-2", env=env)
    assert removed.returncode == 0 and removed.stdout.strip() == "removed worker local-2 (it was lost)"
    assert mloc("workers", "--all", "-q", env=env).stdout.split() == ["local-1"]
    gone = mloc("workers", "remove", "local-2", env=env)
    assert gone.returncode == 2 and "worker local-2 not found" in gone.stderr


def test_artifacts_fetches_a_folder_as_a_streamed_archive(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    cluster = make_cluster(1, env={"RESULTS_DIR": str(results)})
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    task_id = client.submit({"taskType": "echo"})["task_id"]
    assert client.wait(task_id, timeout=60)["state"] == "succeeded"
    # The folder a fine-tuning task leaves (an adapter), with a nested folder and a file of a few blocks.
    adapter = results / task_id / "adapter"
    (adapter / "checkpoint").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    weights = bytes(range(256)) * 4099
    (adapter / "checkpoint" / "weights.bin").write_bytes(weights)

    target = tmp_path / "fetched"
    got = mloc("artifacts", task_id[:8], "--get", "adapter", "-o", str(target), env=env)
    assert got.returncode == 0, got.stderr
    assert (
        got.stderr.strip() == f"wrote 2 file(s), {len(weights) / 1024 / 1024 + 8 / 1024 / 1024:.1f} MiB, to {target}/"
    )
    assert (target / "adapter_config.json").read_text() == '{"r": 8}'
    assert (target / "checkpoint" / "weights.bin").read_bytes() == weights
    again = mloc("artifacts", task_id, "--get", "adapter", "-o", str(target), env=env)
    assert again.returncode == 2 and f"{target} already exists" in again.stderr

    # To stdout: a tar stream, names relative to the folder.
    piped = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "artifacts", task_id, "--get", "adapter/checkpoint", "-o", "-"],
        capture_output=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    with tarfile.open(fileobj=io.BytesIO(piped.stdout), mode="r:") as archive:
        assert archive.getnames() == ["weights.bin"]
        member = archive.extractfile("weights.bin")
        assert member is not None and member.read() == weights

    # The whole task folder, and a folder that does not exist names those that do.
    everything = tmp_path / "all"
    assert mloc("artifacts", task_id, "--get", "/", "-o", str(everything), env=env).returncode == 0
    assert sorted(p.relative_to(everything).as_posix() for p in everything.rglob("*") if p.is_file()) == [
        "adapter/adapter_config.json",
        "adapter/checkpoint/weights.bin",
        "responses.json",
    ]
    missing = mloc("artifacts", task_id, "--get", "adapters", "-o", str(tmp_path / "x"), env=env)
    assert missing.returncode == 2
    assert (
        "has no artifact 'adapters' (no file or folder of that name); its folders: 'adapter', 'adapter/checkpoint'"
        in (missing.stderr)
    )
    assert not (tmp_path / "x").exists()


def test_stats_takes_relative_days_and_names_the_forms(make_cluster: Callable[..., LocalCluster]) -> None:
    today = datetime.now(UTC).date()
    assert parse_day("today", today) == today
    assert parse_day("yesterday", today) == today - timedelta(days=1)
    assert parse_day("7d", today) == today - timedelta(days=7)
    assert parse_day("2026-02-28", today) == date(2026, 2, 28)
    with pytest.raises(typer.BadParameter, match="YYYY-MM-DD, today, yesterday, or Nd"):
        parse_day("last week", today)

    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    assert client.wait(client.submit({"taskType": "echo"})["task_id"], timeout=60)["state"] == "succeeded"
    body = json.loads(mloc("stats", "--start-date", "7d", "--end-date", "today", "--json", env=env).stdout)
    assert body["start_date"] == (today - timedelta(days=7)).isoformat() and body["end_date"] == today.isoformat()
    table = mloc("stats", "--since", "yesterday", env=env).stdout
    assert f"admin: {(today - timedelta(days=1)).isoformat()} .. {today.isoformat()}, per day" in table
    [row] = [line.split() for line in table.splitlines() if line.lstrip().startswith(today.isoformat())]
    assert row[1] == "1"  # one task today
    nobody = mloc("stats", "--user", "nobody", "--since", "7d", env=env)
    assert nobody.returncode == 0
    assert nobody.stdout.strip() == f"nobody: no usage recorded in {(today - timedelta(days=7)).isoformat()} .. {today}"
