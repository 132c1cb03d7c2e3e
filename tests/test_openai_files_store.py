"""An upload (POST /v1/files) to an orchestrator whose RESULTS_DIR cannot be written answers 503 with
what to fix, naming RESULTS_DIR, not a 500 `internal_error`: a read-only container file system (the
orchestrator's RESULTS_DIR left unset under Kubernetes' readOnlyRootFilesystem) and a path through a file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from mloc.localcluster import LocalCluster
from tests.conftest import free_port
from tests.test_log_file import START, orchestrator_env, read_only_folder, serves

__all__ = ["read_only_folder"]  # the fixture, used here by name

BATCH_LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Hi"}}


def _upload(api_url: str) -> httpx.Response:
    return httpx.post(
        f"{api_url}/v1/files",
        files={"file": ("batch.jsonl", orjson.dumps(BATCH_LINE) + b"\n", "application/jsonl")},
        data={"purpose": "batch"},
        timeout=30,
    )


def _assert_names_results_dir(answer: httpx.Response, results_dir: Path, reason: str) -> dict[str, Any]:
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unavailable" and error["type"] == "server_error", error
    message = error["message"]
    assert f"RESULTS_DIR ({results_dir})" in message and reason in message, message
    assert "set RESULTS_DIR to a writable folder" in message, message
    return dict(error)


def test_an_upload_to_a_read_only_results_dir_answers_what_to_fix(
    read_only_folder: tuple[Path, list[str]], redis_url: str, tmp_path: Path
) -> None:
    folder, prefix = read_only_folder
    port = free_port()
    env = orchestrator_env(tmp_path, redis_url, port, RESULTS_DIR=str(folder), MLOC_LOG_FILE="-")
    proc = subprocess.Popen(
        [*prefix, *START], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert serves(port, proc), "the orchestrator did not answer /healthz"
        answer = _upload(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    reason = "Read-only file system" if prefix else "Permission denied"
    _assert_names_results_dir(answer, folder, reason)
    assert "uploads cannot be written" in stderr and "Traceback" not in stderr, stderr
    assert list(folder.iterdir()) == []


def test_an_upload_to_a_results_dir_under_a_file_answers_what_to_fix(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    results_dir = a_file / "results"
    cluster = make_cluster(0, env={"RESULTS_DIR": str(results_dir)})
    _assert_names_results_dir(_upload(cluster.api_url), results_dir, "Not a directory")
