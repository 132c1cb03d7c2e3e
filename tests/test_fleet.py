"""Real orchestrator and worker processes: placement, waiting, worker loss, crashes, drain, cancel."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from mloc import keys
from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.store import utc_day
from tests.support.api import wait_until

A100 = {"MLOC_WORKER_GPUS": "NVIDIA A100-SXM4-80GB:1:81920"}


def sleeper(seconds: float, **extra: object) -> bytes:
    options = {"sleep_sec": seconds, "steps": max(1, int(seconds * 4)), **extra}
    return f"taskType: echo\nhyperparameters: {json.dumps(options)}\n".encode()


def test_task_on_killed_worker_is_requeued_once_and_finished_by_another(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(2)
    client = client_for(cluster)
    answer = client.submit(sleeper(3))
    first = answer["worker_id"]
    wait_until(client, answer["task_id"], lambda r: r["state"] == "running")
    cluster.worker_procs[first].kill()  # SIGKILL: no goodbye, no heartbeat
    requeued = wait_until(client, answer["task_id"], lambda r: r["attempts"] == 2 or r["state"] == "pending", 20)
    done = wait_until(client, answer["task_id"], lambda r: r["state"] in ("succeeded", "failed"), 30)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["worker_id"] != first
    lost = client.worker(first)
    assert lost["status"] == "lost" and lost["tasks"] == []
    assert requeued["state"] in ("pending", "assigned", "running")
    result = client.result(answer["task_id"])
    assert result["attempt"] == 2 and result["worker_id"] == done["worker_id"]


def test_a_lost_worker_spends_a_requeue_not_the_tasks_retries(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    answer = client.submit(b"taskType: echo\nretries: 0\nhyperparameters: {sleep_sec: 20}\n")
    wait_until(client, answer["task_id"], lambda r: r["state"] == "running")
    cluster.worker_procs["local-1"].kill()
    back = wait_until(client, answer["task_id"], lambda r: r["requeues"] == 1, 20)
    assert back["state"] == "pending" and back["reason_code"] == "worker_lost", back
    assert (back["attempts"], back["max_attempts"]) == (1, 1)
    assert "local-1 lost" in back["reason"] and "requeue 1 of 20 after worker loss" in back["reason"]


def test_cleanup_endpoint_requeues_at_once(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"HEARTBEAT_TTL_SEC": "2", "MLOC_REAP_INTERVAL_SEC": "60"})
    client = client_for(cluster)
    answer = client.submit(sleeper(20))
    wait_until(client, answer["task_id"], lambda r: r["state"] == "running")
    cluster.worker_procs["local-1"].send_signal(signal.SIGSTOP)  # alive but silent
    try:
        time.sleep(2.5)
        report = client.cleanup()
        assert report["lost_workers"] == ["local-1"] and report["requeued"] == [answer["task_id"]]
        record = client.task(answer["task_id"])
        assert record["state"] == "pending" and record["reason_code"] == "worker_lost"
        assert "local-1 lost" in record["reason"]
    finally:
        cluster.worker_procs["local-1"].send_signal(signal.SIGCONT)
    # The worker wakes up, learns it was declared lost, registers again and runs the task anew.
    done = wait_until(client, answer["task_id"], lambda r: r["state"] == "succeeded", 40)
    assert done["attempts"] == 2


def test_gpu_task_waits_with_a_reason_and_runs_when_capacity_frees(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[A100])
    client = client_for(cluster)
    gpu_task = (
        b"taskType: echo\nresources: {hardware: {gpu: {type: a100, count: 1}}}\nhyperparameters: {sleep_sec: 1.5}\n"
    )
    first = client.submit(gpu_task)
    second = client.submit(gpu_task)
    assert first["worker_id"] == "local-1"
    assert second["worker_id"] is None and second["state"] == "pending"
    assert second["pending_reason"].startswith("waiting for capacity") and "free GPU" in second["pending_reason"]
    assert client.task(second["task_id"])["pending_reason"] == second["pending_reason"]
    never = client.submit(b"taskType: echo\nresources: {hardware: {gpu: {type: H100, count: 1}}}\n")
    assert never["unschedulable"] is True
    assert never["pending_reason"].startswith("no registered worker can run this task")
    done = wait_until(client, second["task_id"], lambda r: r["state"] == "succeeded", 20)
    assert done["worker_id"] == "local-1"
    assert client.task(first["task_id"])["state"] == "succeeded"
    assert client.worker("local-1")["free"]["gpus"] == [0]


def test_capacity_is_never_oversubscribed(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], redis_url: str
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_CPU": "2", "MLOC_WORKER_SLOTS": "8"}])
    client = client_for(cluster)
    task = b"taskType: echo\nresources: {hardware: {cpu: 1}}\nhyperparameters: {sleep_sec: 0.3}\n"
    ids = [client.submit(task)["task_id"] for _ in range(8)]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    peak = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = r.zcard(keys.tasks_in_state("running")) + r.zcard(keys.tasks_in_state("assigned"))
        peak = max(peak, running)
        assert int(r.hget(keys.worker("local-1"), "cpu_free")) >= 0
        if r.zcard(keys.tasks_in_state("succeeded")) == 8:
            break
        time.sleep(0.02)
    assert peak <= 2
    assert all(client.task(t)["state"] == "succeeded" for t in ids)
    assert r.hget(keys.worker("local-1"), "cpu_free") == "2000"


def test_executor_crash_fails_its_task_not_the_worker(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    crash = client.submit(b"taskType: echo\nhyperparameters: {isolate: true, crash: true}\n")
    failed = wait_until(client, crash["task_id"], lambda r: r["state"] == "failed")
    assert failed["reason_code"] == "executor_crashed" and "SIGKILL" in failed["reason"]
    boom = client.submit(b"taskType: echo\nhyperparameters: {fail_message: 'dataset row 3 is not JSON'}\n")
    failed = wait_until(client, boom["task_id"], lambda r: r["state"] == "failed")
    assert failed["reason"] == "dataset row 3 is not JSON"
    ok = client.submit(b"taskType: echo\nhyperparameters: {isolate: true}\n")
    assert wait_until(client, ok["task_id"], lambda r: r["state"] == "succeeded")["worker_id"] == "local-1"
    assert cluster.worker_procs["local-1"].poll() is None


def test_cancel_pending_and_running_tasks(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "1"}])
    client = client_for(cluster)
    running = client.submit(sleeper(60, isolate=True))
    queued = client.submit(sleeper(60))
    assert queued["state"] == "pending"
    wait_until(client, running["task_id"], lambda r: r["state"] == "running")
    assert client.cancel(queued["task_id"])["state"] == "cancelled"
    started = time.monotonic()
    assert client.cancel(running["task_id"])["state"] == "cancelling"
    # Until its worker has stopped it, the record says so (a second cancel changes nothing).
    assert client.task(running["task_id"])["state"] in ("cancelling", "cancelled")
    assert client.cancel(running["task_id"])["state"] in ("cancelling", "cancelled")
    done = wait_until(client, running["task_id"], lambda r: r["state"] == "cancelled", 15)
    assert time.monotonic() - started < 5
    assert done["reason_code"] == "cancelled_by_user"
    assert client.worker("local-1")["free"]["slots"] == 1
    after = client.submit(b"taskType: echo\n")
    assert wait_until(client, after["task_id"], lambda r: r["state"] == "succeeded")


def test_a_task_that_ignores_its_cancel_reads_cancelling_until_its_executor_is_killed(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_CANCEL_GRACE_SEC": "3"}, worker_env=[{"MLOC_WORKER_SLOTS": "1"}])
    client = client_for(cluster)
    hung = client.submit(b"taskType: echo\nhyperparameters: {sleep_sec: 60, isolate: true, ignore_cancel: true}\n")
    wait_until(client, hung["task_id"], lambda r: r["state"] == "running")
    started = time.monotonic()
    assert client.cancel(hung["task_id"])["state"] == "cancelling"
    time.sleep(1)
    record = client.task(hung["task_id"])
    assert (record["state"], record["cancel_requested"]) == ("cancelling", True)
    assert client.cancel(hung["task_id"])["state"] == "cancelling"
    done = wait_until(client, hung["task_id"], lambda r: r["state"] == "cancelled", 30)
    assert 3 <= time.monotonic() - started < 15
    assert done["reason_code"] == "cancelled_by_user"
    assert done["reason"].startswith("cancelled on request; the executor did not stop within 3s"), done["reason"]
    texts = [line["text"] for line in client.logs(hung["task_id"])["lines"]]
    assert sum("cancel requested" in text for text in texts) == 1, texts
    assert client.worker("local-1")["free"]["slots"] == 1


def test_sigterm_finishes_running_work_and_hands_back_the_rest(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_SHUTDOWN_GRACE_SEC": "10"}, worker_env=[{"MLOC_WORKER_SLOTS": "1"}])
    client = client_for(cluster)
    running = client.submit(sleeper(1.5))
    waiting = client.submit(sleeper(0.1))
    wait_until(client, running["task_id"], lambda r: r["state"] == "running")
    cluster.stop_worker("local-1", signal.SIGTERM)
    assert client.task(running["task_id"])["state"] == "succeeded"
    assert client.worker("local-1")["status"] == "offline"
    assert client.task(waiting["task_id"])["state"] == "pending"
    cluster.add_worker("local-2")
    assert wait_until(client, waiting["task_id"], lambda r: r["state"] == "succeeded", 30)["worker_id"] == "local-2"


def test_a_worker_draining_for_longer_than_the_heartbeat_ttl_beats_on_and_finishes_its_task(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    # The grace (10 s) and the task (6 s) both outlast HEARTBEAT_TTL_SEC (3 s): a worker that stopped
    # beating when told to stop would be declared lost, and its task requeued, half-way through.
    cluster = make_cluster(1, env={"MLOC_SHUTDOWN_GRACE_SEC": "10"})
    client = client_for(cluster)
    running = client.submit(sleeper(6))
    wait_until(client, running["task_id"], lambda r: r["state"] == "running")
    cluster.stop_worker("local-1", signal.SIGTERM)
    done = client.task(running["task_id"])
    assert done["state"] == "succeeded" and done["attempts"] == 1, done
    assert client.worker("local-1")["status"] == "offline"


def test_restart_with_the_same_worker_id_requeues_what_it_held(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"HEARTBEAT_TTL_SEC": "60"})
    client = client_for(cluster)
    answer = client.submit(sleeper(30))
    wait_until(client, answer["task_id"], lambda r: r["state"] == "running")
    cluster.worker_procs.pop("local-1").kill()
    cluster.add_worker("local-1", {"TASK_TOPICS": "none"})  # same id, takes nothing now
    record = wait_until(client, answer["task_id"], lambda r: r["state"] == "pending", 30)
    assert record["reason_code"] == "worker_restarted" and record["attempts"] == 1


def test_results_are_written_atomically_under_results_dir(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    answer = client.submit(b"taskType: echo\npayload: {answer: 42}\n")
    wait_until(client, answer["task_id"], lambda r: r["state"] == "succeeded")
    folder = tmp_path / "results" / answer["task_id"]
    assert json.loads((folder / "responses.json").read_text())["payload"] == {"answer": 42}
    assert [p.name for p in folder.iterdir()] == ["responses.json"]


def test_unwritable_results_dir_fails_the_task_clearly(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    results = tmp_path / "volume"
    cluster = make_cluster(1, worker_env=[{"RESULTS_DIR": str(results)}])
    client = client_for(cluster)
    results.rmdir()
    results.write_text("the volume went away: a file stands where the results folder was")
    answer = client.submit(b"taskType: echo\n")
    failed = wait_until(client, answer["task_id"], lambda r: r["state"] == "failed")
    assert failed["reason"].startswith(f"cannot write results to {results / answer['task_id']}")
    assert cluster.worker_procs["local-1"].poll() is None
    results.unlink()
    results.mkdir()
    again = client.submit(b"taskType: echo\n")
    assert wait_until(client, again["task_id"], lambda r: r["state"] == "succeeded")


def test_worker_refuses_to_start_without_a_usable_results_dir(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cluster = make_cluster(0)
    proc = cluster.add_worker("bad", {"RESULTS_DIR": str(blocker / "results")})
    assert proc.wait(30) != 0
    log = (tmp_path / "logs" / "bad.log").read_text()
    assert "RESULTS_DIR" in log and "Traceback" not in log


def test_a_task_past_its_timeout_is_stopped_and_fails(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_CANCEL_GRACE_SEC": "1"})
    client = client_for(cluster)
    polite = client.submit(b"taskType: echo\ntimeout_sec: 1\nhyperparameters: {sleep_sec: 60}\n")
    hung = client.submit(
        b"taskType: echo\ntimeout_sec: 1\nhyperparameters: {sleep_sec: 60, isolate: true, ignore_cancel: true}\n"
    )
    started = time.monotonic()
    for answer in (polite, hung):
        failed = wait_until(client, answer["task_id"], lambda r: r["state"] == "failed", 30)
        assert failed["reason_code"] == "timeout"
        assert "spec.timeout_sec (1s)" in failed["reason"]
    assert time.monotonic() - started < 20
    assert client.worker("local-1")["free"]["slots"] == 4
    ok = client.submit(b"taskType: echo\ntimeout_sec: 30\n")
    assert wait_until(client, ok["task_id"], lambda r: r["state"] == "succeeded")


def test_the_admins_time_limit_per_task_type_applies_where_a_task_sets_none(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_TASK_TIMEOUTS": '{"echo": 1, "*": 3600}', "MLOC_CANCEL_GRACE_SEC": "1"})
    client = client_for(cluster)
    limited = client.submit(b"taskType: echo\nhyperparameters: {sleep_sec: 60}\n")
    record = client.task(limited["task_id"])
    # Visible on the task: its spec carries the limit, a label says whose it is.
    assert (
        record["spec"]["spec"]["timeout_sec"] == 1 and record["labels"]["mloc.timeout"] == "MLOC_TASK_TIMEOUTS (echo)"
    )
    failed = wait_until(client, limited["task_id"], lambda r: r["state"] == "failed", 30)
    assert failed["reason_code"] == "timeout"
    assert "the admin's limit, MLOC_TASK_TIMEOUTS (echo) (1s)" in failed["reason"]
    # The task's own limit wins over the admin's default.
    own = client.submit(b"taskType: echo\ntimeout_sec: 30\nhyperparameters: {sleep_sec: 1.5}\n")
    assert wait_until(client, own["task_id"], lambda r: r["state"] == "succeeded")["labels"] == {}


def test_a_malformed_task_timeouts_setting_names_the_variable_and_the_fix() -> None:
    from mloc.settings import Settings

    for value, expected in (("{", "is not JSON"), ('{"sft": -1}', "'sft': -1 is not a number of seconds")):
        with pytest.raises(ValueError, match=expected) as caught:
            Settings(MLOC_TASK_TIMEOUTS=value)
        assert "MLOC_TASK_TIMEOUTS" in str(caught.value) or "task_timeouts" in str(caught.value)


def test_a_stopped_workers_handed_back_task_counts_the_time_it_used_but_no_task(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], redis_url: str
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit(sleeper(30))["task_id"]
    running = wait_until(client, task_id, lambda r: r["state"] == "running", 30)
    time.sleep(1.5)
    cluster.stop_worker("local-1")  # SIGTERM: the worker drains, then hands the task back
    back = wait_until(client, task_id, lambda r: r["state"] == "pending", 30)
    assert back["reason_code"] == "worker_shutdown", back
    ended = time.time()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    daily: dict[str, float] = {}
    for day in {utc_day(running["started_at"]), utc_day(ended)}:  # the hand-back may fall past midnight
        for name, value in r.hgetall(keys.usage_day("admin", day)).items():
            daily[name] = daily.get(name, 0.0) + float(value)
    # The time it ran is the owner's (what a lost worker used is not known; a stopped one's is), but it
    # ended no task: it runs again.
    assert daily.get("wall_sec", 0.0) >= 1.5 and daily.get("cpu_seconds", 0.0) > 0, daily
    assert "tasks" not in daily and not any(name.startswith("state.") for name in daily), daily
