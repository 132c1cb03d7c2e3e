"""Task artifacts: published by the worker to a shared store, served by the orchestrator to the task's owner.

The store tests use real fsspec file systems (memory://, file://, and S3 through a local moto server);
the cluster tests run a real orchestrator and worker and read the files over HTTP and through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import ValidationError

from mloc import artifacts
from mloc.artifacts import ArtifactStore, ArtifactUploadError, check_path
from mloc.client import Client
from mloc.errors import BadRequest, ConfigError, NotFound
from mloc.localcluster import LocalCluster
from mloc.settings import Settings
from tests.conftest import FAST_ENV, free_port

ADMIN_TOKEN = "admin-token-for-artifact-tests"


def task_folder(root: Path) -> Path:
    """A result folder as an executor leaves it: a result file, a nested file, and a link out of it."""
    (root / "adapter").mkdir(parents=True)
    (root / "responses.json").write_text('{"ok": true}\n')
    (root / "adapter" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (root / "escape").symlink_to("/etc/hostname")
    return root


# ---------------------------------------------------------------------------------- the store itself
def test_publish_uploads_every_file_then_the_manifest_and_reads_them_back(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://mloc-{uuid.uuid4().hex}")
    folder = task_folder(tmp_path / "t1")
    published = store.publish("t1", 1, "w1", folder)
    assert {(a.path, a.size) for a in published} == {("responses.json", 13), ("adapter/weights.bin", 10240)}
    listing = store.listing("t1", 1)
    assert listing is not None and listing.source == "store" and listing.attempt == 1
    assert {a.path for a in listing.items} == {"responses.json", "adapter/weights.bin"}  # the link is not published
    with store.open("t1", 1, "adapter/weights.bin") as handle:
        assert handle.read() == bytes(range(256)) * 40
    assert store.listing("t1", 2) is None  # another attempt published nothing
    manifest = json.loads(store.fs.cat_file(f"{store.root}/t1/1/manifest.json"))
    assert manifest["worker_id"] == "w1" and manifest["attempt"] == 1


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory file system whose uploads fail while ``failing`` is set, like a store losing its network."""

    protocol = "mloc-flaky"
    root_marker = "/"
    failing = False
    puts = 0

    def put_file(self, lpath: Any, rpath: Any, *args: Any, **kwargs: Any) -> None:
        type(self).puts += 1
        if type(self).failing and type(self).puts > 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        super().put_file(lpath, rpath, *args, **kwargs)


@pytest.fixture
def flaky() -> Iterator[type[FlakyFileSystem]]:
    fsspec.register_implementation("mloc-flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.failing, FlakyFileSystem.puts = True, 0
    yield FlakyFileSystem
    FlakyFileSystem.failing = False


def test_an_upload_cut_halfway_leaves_no_manifest_and_names_the_cause(
    tmp_path: Path, flaky: type[FlakyFileSystem]
) -> None:
    store = ArtifactStore(f"mloc-flaky://store-{uuid.uuid4().hex}")
    folder = task_folder(tmp_path / "t2")
    with pytest.raises(ArtifactUploadError) as failure:
        store.publish("t2", 1, "w1", folder)
    message = failure.value.message
    assert "could not publish the results of task t2 to the artifact store mloc-flaky://" in message
    assert "ConnectionResetError" in message and "check MLOC_ARTIFACT_STORE" in message
    assert flaky.puts == 2  # one file made it, the second did not
    assert store.listing("t2", 1) is None  # so no reader ever sees that half
    flaky.failing = False
    store.publish("t2", 1, "w1", folder)  # the same attempt again: leftovers replaced, manifest last
    listing = store.listing("t2", 1)
    assert listing is not None and len(listing.items) == 2


def test_artifact_paths_that_could_leave_the_task_folder_are_refused(tmp_path: Path) -> None:
    for bad in ["", "/etc/passwd", "../other-task/responses.json", "a/../../b", "a\\..\\b", "a//b", "./a", "a\x00b"]:
        with pytest.raises(BadRequest, match="is not allowed; give a path relative to the task's folder"):
            check_path(bad)
    assert check_path("adapter/weights.bin") == "adapter/weights.bin"
    settings = Settings.model_validate({"RESULTS_DIR": str(tmp_path)})
    task_folder(tmp_path / "t3")
    listing = artifacts.listing(settings, "t3", "succeeded", 1, "w1")
    assert listing.source == "results_dir" and {a.path for a in listing.items} == {
        "responses.json",
        "adapter/weights.bin",
    }
    with pytest.raises(NotFound, match="has no artifact 'escape'"):
        artifacts.open_artifact(settings, listing, "escape")  # the link exists on disk, but is not served
    with pytest.raises(NotFound, match=r"they are on worker w9's disk in its RESULTS_DIR. Set MLOC_ARTIFACT_STORE"):
        artifacts.listing(settings, "elsewhere", "succeeded", 1, "w9")


def test_bad_store_settings_are_named() -> None:
    # Refused with the other settings at start-up (test_settings), never first met by a task.
    with pytest.raises(ValidationError, match="is not JSON"):
        Settings.model_validate({"MLOC_ARTIFACT_STORE": "memory://x", "MLOC_ARTIFACT_STORE_OPTIONS": "{"})
    with pytest.raises(
        ConfigError,
        match="MLOC_ARTIFACT_STORE 'nosuchfs://x' cannot be opened: Protocol not known: nosuchfs; use file://",
    ):
        ArtifactStore("nosuchfs://x")


# -------------------------------------------------------------------- orchestrator + worker processes
@pytest.fixture
def cluster_factory(redis_url: str) -> Iterator[Any]:
    """Real orchestrator and worker processes on the test Redis, with an admin token."""
    clusters: list[LocalCluster] = []

    def make(tmp: Path, env: dict[str, str], worker_env: list[Mapping[str, str]] | None = None) -> LocalCluster:
        cluster = LocalCluster(
            home=tmp / "home",
            workers=len(worker_env or [{}]),
            redis_url=redis_url,
            results_dir=tmp / "worker-results",
            env={**FAST_ENV, "ORCHESTRATOR_TOKEN": ADMIN_TOKEN, **env},
            worker_env=worker_env or [],
            log_dir=tmp / "logs",
        )
        clusters.append(cluster)
        return cluster.start(timeout=60)

    yield make
    for cluster in clusters:
        cluster.stop()


def run_cli(cluster: LocalCluster, token: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOC_")}
    env.update({"MLOC_API_URL": cluster.api_url, "MLOC_TOKEN": token})
    return subprocess.run(
        [sys.executable, "-m", "mloc.cli", "artifacts", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_orchestrator_serves_files_from_a_shared_store_after_the_worker_deleted_them(
    cluster_factory: Any, tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    cluster = cluster_factory(
        tmp_path,
        {"MLOC_ARTIFACT_STORE": f"file://{store}"},
        [
            {"WORKER_TAGS": "good-store"},
            {"MLOC_ARTIFACT_STORE": f"file://{blocker}/store", "WORKER_TAGS": "broken-store"},
        ],
    )
    admin = Client(cluster.api_url, ADMIN_TOKEN)
    token = admin.add_user("alice")["token"]
    alice = Client(cluster.api_url, token)
    bob = Client(cluster.api_url, admin.add_user("bob")["token"])
    try:
        task_id = alice.submit(b"taskType: echo\npayload: {answer: 42}\nresources: {tags: [good-store]}\n")["task_id"]
        record = alice.wait(task_id, timeout=30)
        assert record["state"] == "succeeded", record["reason"]
        shutil.rmtree(tmp_path / "worker-results")  # the worker's own copy is gone

        listing = alice._call("GET", f"/api/v1/tasks/{task_id}/artifacts")
        assert listing["source"] == "store" and listing["attempt"] == 1
        size = (store / task_id / "1" / "files" / "responses.json").stat().st_size
        assert listing["items"] == [{"path": "responses.json", "size": size}]
        download = alice.http.get(f"/api/v1/tasks/{task_id}/artifacts/responses.json")
        assert download.status_code == 200 and download.headers["content-length"] == str(size)
        assert json.loads(download.content)["payload"] == {"answer": 42}
        assert admin.http.get(f"/api/v1/tasks/{task_id}/artifacts/responses.json").status_code == 200

        # Another user's task looks like a missing one; escaping paths are refused before any lookup.
        assert bob.http.get(f"/api/v1/tasks/{task_id}/artifacts").status_code == 404
        assert bob.http.get(f"/api/v1/tasks/{task_id}/artifacts/responses.json").status_code == 404
        for bad in ["..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "files%2F..%2F..%2Fmanifest.json"]:
            answer = alice.http.get(f"/api/v1/tasks/{task_id}/artifacts/{bad}")
            assert answer.status_code == 400 and "is not allowed" in answer.json()["message"], (bad, answer.text)
        missing = alice.http.get(f"/api/v1/tasks/{task_id}/artifacts/manifest.json")
        assert missing.status_code == 404 and "has no artifact 'manifest.json'" in missing.json()["message"]

        shown = run_cli(cluster, token, task_id, cwd=tmp_path)
        assert shown.returncode == 0 and "responses.json" in shown.stdout and str(size) in shown.stdout, shown
        got = run_cli(cluster, token, task_id, "--get", "responses.json", "-o",
                      str(tmp_path / "copy.json"), cwd=tmp_path)  # fmt: skip
        assert got.returncode == 0, got
        assert json.loads((tmp_path / "copy.json").read_text())["payload"] == {"answer": 42}
        refused = run_cli(cluster, token, task_id, "--get", "nope.txt", cwd=tmp_path)
        assert refused.returncode == 2 and "has no artifact 'nope.txt'" in refused.stderr

        # A worker whose store cannot be written fails the task with the reason instead of reporting success.
        broken = alice.submit(b"taskType: echo\nretries: 0\nresources: {tags: [broken-store]}\n")["task_id"]
        failed = alice.wait(broken, timeout=30)
        assert failed["state"] == "failed", failed
        assert (
            "could not publish the results of task" in failed["reason"]
            and "check MLOC_ARTIFACT_STORE" in failed["reason"]
        )
        no_files = alice.http.get(f"/api/v1/tasks/{broken}/artifacts")
        assert no_files.status_code == 404 and "has no published artifacts (it is failed)" in no_files.json()["message"]
    finally:
        for client in (admin, alice, bob):
            client.close()


def test_without_a_store_the_orchestrator_serves_a_results_dir_it_shares(cluster_factory: Any, tmp_path: Path) -> None:
    cluster = cluster_factory(tmp_path, {"RESULTS_DIR": str(tmp_path / "worker-results")})
    client = Client(cluster.api_url, ADMIN_TOKEN)
    try:
        task_id = client.submit(b"taskType: echo\npayload: local\n")["task_id"]
        assert client.wait(task_id, timeout=30)["state"] == "succeeded"
        listing = client._call("GET", f"/api/v1/tasks/{task_id}/artifacts")
        assert listing["source"] == "results_dir" and [i["path"] for i in listing["items"]] == ["responses.json"]
        body = client.http.get(f"/api/v1/tasks/{task_id}/artifacts/responses.json")
        assert body.status_code == 200 and json.loads(body.content)["payload"] == "local"
    finally:
        client.close()


# ------------------------------------------------------------------------------ S3 (moto server)
@pytest.mark.extra("s3")
@pytest.mark.parametrize("endpoint_from", ["AWS_ENDPOINT_URL", "MLOC_ARTIFACT_STORE_OPTIONS"])
def test_artifacts_through_an_s3_compatible_server(cluster_factory: Any, tmp_path: Path, endpoint_from: str) -> None:
    # The s3 and dev extras (scripts/setup.sh installs both) bring s3fs and moto.
    import boto3
    import moto.server as server_module

    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="mloc-artifacts")
        # The AWS libraries' own variable serves every s3:// URL; the store's options serve the store alone.
        where = endpoint if endpoint_from == "AWS_ENDPOINT_URL" else json.dumps({"endpoint_url": endpoint})
        cluster = cluster_factory(
            tmp_path, {"MLOC_ARTIFACT_STORE": "s3://mloc-artifacts/runs", endpoint_from: where, **credentials}
        )
        client = Client(cluster.api_url, ADMIN_TOKEN)
        try:
            task_id = client.submit(b"taskType: echo\npayload: {via: s3}\n")["task_id"]
            record = client.wait(task_id, timeout=60)
            assert record["state"] == "succeeded", record
            objects = s3.list_objects_v2(Bucket="mloc-artifacts", Prefix=f"runs/{task_id}/")
            names = sorted(o["Key"] for o in objects.get("Contents", []))
            assert names == [f"runs/{task_id}/1/files/responses.json", f"runs/{task_id}/1/manifest.json"]
            listing = client._call("GET", f"/api/v1/tasks/{task_id}/artifacts")
            assert [i["path"] for i in listing["items"]] == ["responses.json"]
            body = client.http.get(f"/api/v1/tasks/{task_id}/artifacts/responses.json")
            assert body.status_code == 200 and json.loads(body.content)["payload"] == {"via": "s3"}
        finally:
            client.close()
    finally:
        server.stop()


# ------------------------------------------------------------- outputs loaded on another host's worker
def test_an_output_folder_missing_here_is_copied_once_from_the_store(tmp_path: Path) -> None:
    from mloc.worker.outputs import ADAPTER, _copy_from_store

    task_id = str(uuid.uuid4())
    trained = task_folder(tmp_path / "trainer-results" / task_id)
    settings = Settings.model_validate({"MLOC_ARTIFACT_STORE": f"file://{tmp_path / 'store'}"})
    ArtifactStore(f"file://{tmp_path / 'store'}").publish(task_id, 2, "trainer", trained)
    models = tmp_path / "models"

    copied = Path(_copy_from_store(settings, models, task_id, 2, str(trained / "adapter"), ADAPTER))
    assert copied == models / "task-outputs" / task_id / "2" / "adapter"
    assert (copied / "weights.bin").read_bytes() == (trained / "adapter" / "weights.bin").read_bytes()
    assert [p.name for p in copied.parent.iterdir()] == ["adapter"]  # no staging folder left behind
    # Kept: a later task on this worker loads the copy without reading the store.
    shutil.rmtree(tmp_path / "store")
    assert _copy_from_store(settings, models, task_id, 2, str(trained / "adapter"), ADAPTER) == str(copied)

    from mloc.errors import ExecutionError

    with pytest.raises(ExecutionError, match=r"not among its files in the artifact store .* \(attempt 3\)"):
        _copy_from_store(settings, models, task_id, 3, str(trained / "adapter"), ADAPTER)
    with pytest.raises(
        ExecutionError, match="on the disk of the worker that ran it, not on this one; set MLOC_ARTIFACT"
    ):
        _copy_from_store(Settings(), models, str(uuid.uuid4()), 1, "/elsewhere/adapter", ADAPTER)


@pytest.mark.extra("train", "inference")
def test_an_adapter_and_a_merged_model_trained_on_one_host_load_on_another(
    cluster_factory: Any, tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"
    cluster = cluster_factory(
        tmp_path,
        {"MLOC_ARTIFACT_STORE": f"file://{store}"},
        [
            {"WORKER_TAGS": "trainer", "RESULTS_DIR": str(tmp_path / "trainer-results")},
            {"WORKER_TAGS": "server", "RESULTS_DIR": str(tmp_path / "server-results")},
        ],
    )
    tiny = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
    prompt = {"max_tokens": 3, "temperature": 0, "prompts": ["Question: 2 plus 2?\nAnswer:"]}
    admin = Client(cluster.api_url, ADMIN_TOKEN)
    try:
        sft = {
            "taskType": "sft",
            "model": {"source": tiny["source"], "adapter": {"r": 4, "lora_alpha": 8}},
            "dataset": {"examples": [{"prompt": "Question: 2 plus 2?\nAnswer:", "completion": " 4"}] * 4},
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "merge_adapter": True, "save_steps": 10},
            "resources": {"tags": ["trainer"]},
        }
        trained = admin.wait(admin.submit({"spec": sft})["task_id"], timeout=300)
        assert trained["state"] == "succeeded", trained["reason"]
        # The trainer's disk is another host's: this one cannot read it.
        shutil.rmtree(tmp_path / "trainer-results" / trained["task_id"])
        serve = {"taskType": "inference", "inference": prompt, "resources": {"tags": ["server"]}}
        with_adapter = {**serve, "model": {**tiny, "adapter": {"path": trained["task_id"]}}}
        merged = {
            **serve,
            "model": {"source": {"type": "task", "identifier": trained["task_id"]}, "engine": "transformers"},
        }
        for spec, folder in ((with_adapter, "adapter"), (merged, "merged")):
            record = admin.wait(admin.submit({"spec": spec})["task_id"], timeout=300)
            assert record["state"] == "succeeded", (folder, record["reason"])
            assert record["worker_id"] == "local-2"
        copies = tmp_path / "home" / "models" / "task-outputs" / trained["task_id"] / "1"
        assert sorted(p.name for p in copies.iterdir()) == ["adapter", "merged"], list(copies.iterdir())
        assert (copies / "adapter" / "adapter_config.json").is_file()
    finally:
        admin.close()
