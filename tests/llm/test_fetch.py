"""Workers download models: hub ids from a local stand-in for the Hugging Face Hub (tests/support/hubserver),
https .gguf files, and s3 objects through a local moto server. Real HTTP, real processes, real files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mloc.client import Client
from mloc.errors import ExecutionError
from mloc.llm.downloads import downloads_root, held_models, release_all
from mloc.llm.fetch import FetchOptions, hub_entry
from mloc.llm.modelsource import resolve_model
from mloc.llm.urls import fetch_url, url_entry
from mloc.localcluster import LocalCluster
from mloc.modelroots import references
from mloc.settings import get_settings
from mloc.spec.base import ModelSource, SourceType
from tests.support.hubserver import HubServer
from tests.support.s3server import s3_server

pytestmark = pytest.mark.extra("inference")

REPO = "mloc-test/tiny-llama"
MB = 1 << 20


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server
    release_all()  # the use locks this test process took


def options(hub: HubServer, **values: Any) -> FetchOptions:
    return FetchOptions(**{"hf_endpoint": hub.url, "min_free_bytes": 0, **values})


def fake_model(weights: int, seed: int = 0) -> dict[str, bytes]:
    """A model folder's files, without a real model: enough for the transport."""
    return {
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        "model.safetensors": hashlib.sha256(str(seed).encode()).digest() * (weights // 32),
        "tokenizer.json": b"{}",
    }


def model_source(identifier: str, **values: Any) -> ModelSource:
    return ModelSource(identifier=identifier, **values)


def weights_gets(hub: HubServer, name: str = "model.safetensors") -> list[Any]:
    return [request for request in hub.hub.seen("GET", "/resolve/") if request.path.endswith(name)]


# --------------------------------------------------------------------------- the hub, in this process


def test_a_hub_model_is_downloaded_on_first_use_then_read_from_disk(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    files = {str(p.relative_to(tiny_model)): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    # Other frameworks' exports and the same weights in an older format are not fetched.
    files |= {"onnx/model.onnx": b"onnx", "pytorch_model.bin": b"old weights", "flax_model.msgpack": b"flax"}
    commit = hub.hub.add_repo(REPO, files)
    models = tmp_path / "models"
    reports: list[tuple[int, int | None, str]] = []

    folder = resolve_model(model_source(REPO), models, options=options(hub), on_progress=lambda *a: reports.append(a))

    assert folder == downloads_root(models) / "hf--mloc-test--tiny-llama" / commit
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name[0] != ".") == sorted(
        str(p.relative_to(tiny_model)) for p in tiny_model.rglob("*") if p.is_file()
    )
    assert AutoModelForCausalLM.from_pretrained(folder).config.hidden_size > 0
    total = sum(len(data) for name, data in files.items() if not name.endswith((".onnx", ".bin", ".msgpack")))
    assert reports[-1][:2] == (total, total) and reports[-1][2].startswith(f"downloaded {REPO} (")
    fetched = len(hub.hub.seen("GET", "/resolve/"))
    assert fetched == len(files) - 3

    # A later task (another revision name for the same commit too) reads the disk, not the hub's files.
    assert resolve_model(model_source(REPO), models, options=options(hub)) == folder
    assert resolve_model(model_source(REPO, revision=commit), models, options=options(hub)) == folder
    assert len(hub.hub.seen("GET", "/resolve/")) == fetched
    assert held_models(models) == [REPO]


def test_an_offline_worker_refuses_a_missing_model_and_reaches_nothing(hub: HubServer, tmp_path: Path) -> None:
    hub.hub.add_repo(REPO, fake_model(MB))
    with pytest.raises(ExecutionError, match=r"offline .*MLOC_OFFLINE=0.*local Hugging Face cache") as info:
        resolve_model(model_source(REPO), tmp_path, options=options(hub, offline=True))
    assert "mloc-test/tiny-llama" in info.value.message
    assert hub.hub.requests == []
    # Once the model is here, an offline worker uses it: the branch name was recorded with the download.
    folder = resolve_model(model_source(REPO), tmp_path, options=options(hub))
    count = len(hub.hub.requests)
    assert resolve_model(model_source(REPO), tmp_path, options=options(hub, offline=True)) == folder
    assert len(hub.hub.requests) == count


def test_the_offline_switch_comes_from_mloc_offline_else_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**env: str) -> bool:
        for name in ("MLOC_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            return FetchOptions.from_environment().offline
        finally:
            get_settings.cache_clear()

    assert offline() is False
    assert offline(HF_HUB_OFFLINE="1") is True
    assert offline(MLOC_OFFLINE="1") is True
    # MLOC_OFFLINE=0 downloads even where HF_HUB_OFFLINE keeps the libraries themselves off the hub.
    assert offline(HF_HUB_OFFLINE="1", MLOC_OFFLINE="0") is False


def test_a_dropped_connection_resumes_where_it_stopped(hub: HubServer, tmp_path: Path) -> None:
    files = fake_model(2 * MB)
    hub.hub.add_repo(REPO, files)
    hub.hub.drops, hub.hub.drop_only = 1, "model.safetensors"
    folder = resolve_model(model_source(REPO), tmp_path, options=options(hub))
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    first, second = weights_gets(hub)
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(files['model.safetensors']) // 2}-"


def test_a_wrong_file_is_caught_by_its_sha256_and_removed(hub: HubServer, tmp_path: Path) -> None:
    commit = hub.hub.add_repo(REPO, fake_model(MB))
    # The server's bytes change under the listing it gave (a corrupt mirror): the check refuses them.
    hub.hub.corrupt["model.safetensors"] = b"x" * MB
    with pytest.raises(ExecutionError, match=r"does not match its SHA-256"):
        resolve_model(model_source(REPO), tmp_path, options=options(hub))
    assert not (hub_entry(tmp_path, REPO).path / commit).exists()


def test_the_token_is_sent_to_the_hub_and_shown_nowhere(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hf_very_secret_token_1234"
    hub.hub.token = secret
    hub.hub.add_repo(REPO, fake_model(MB))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ExecutionError, match=r"needs a Hugging Face token.*HF_TOKEN") as refused:
        resolve_model(model_source(REPO), tmp_path, options=options(hub))
    with pytest.raises(ExecutionError, match=r"token in HF_TOKEN was refused") as wrong:
        resolve_model(model_source(REPO), tmp_path, options=options(hub, hf_token="hf_wrong"))
    reports: list[str] = []
    fetch = options(hub, hf_token=secret)
    folder = resolve_model(model_source(REPO), tmp_path, options=fetch, on_progress=lambda *a: reports.append(a[2]))
    assert (folder / "config.json").is_file()
    authorized = [r for r in hub.hub.requests if r.headers.get("authorization") == f"Bearer {secret}"]
    assert len(authorized) == 5  # revision, tree, and the three files
    shown = [refused.value.message, wrong.value.message, caplog.text, repr(fetch), *reports]
    shown += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < MB]
    assert not [text for text in shown if secret in text]


def test_a_download_the_disk_cannot_take_is_refused_before_it_starts(hub: HubServer, tmp_path: Path) -> None:
    hub.hub.add_repo(REPO, fake_model(MB))
    with pytest.raises(ExecutionError) as info:
        resolve_model(model_source(REPO), tmp_path, options=options(hub, min_free_bytes=1 << 50))
    message = info.value.message
    assert "needs 1.0 MB (1048612 bytes) more on disk" in message and "bytes) free" in message
    assert "MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES" in message
    with pytest.raises(ExecutionError, match=r"budget MLOC_MODEL_DOWNLOADS_MAX_BYTES is 1000 bytes"):
        resolve_model(model_source(REPO), tmp_path, options=options(hub, max_bytes=1000))
    assert weights_gets(hub) == []


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mloc.llm.downloads import Entry, hold
    hold(Entry(Path(sys.argv[1]), sys.argv[2]))
    print("held", flush=True)
    sys.stdin.read()
    """
)


def test_eviction_removes_the_least_recently_used_download_that_no_process_uses(hub: HubServer, tmp_path: Path) -> None:
    for index, name in enumerate(("a", "b", "c")):
        hub.hub.add_repo(f"mloc-test/{name}", fake_model(MB, seed=index))
    fetch = options(hub, max_bytes=int(2.5 * MB))
    first = resolve_model(model_source("mloc-test/a"), tmp_path, options=fetch)
    second = resolve_model(model_source("mloc-test/b"), tmp_path, options=fetch)
    release_all()
    # a is the least recently used, but another process uses it.
    entry_a, entry_b = hub_entry(tmp_path, "mloc-test/a"), hub_entry(tmp_path, "mloc-test/b")
    os.utime(entry_a.use_lock, (time.time() - 100, time.time() - 100))
    os.utime(entry_b.use_lock, (time.time() - 50, time.time() - 50))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry_a.root), entry_a.name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        third = resolve_model(model_source("mloc-test/c"), tmp_path, options=fetch)
    finally:
        holder.communicate("", timeout=30)
    assert first.is_dir() and not second.exists() and third.is_dir()
    assert held_models(tmp_path) == ["mloc-test/a", "mloc-test/c"]


def test_an_evicted_engine_no_longer_pins_its_downloaded_model(
    hub: HubServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mloc.llm.cache import EngineCache
    from mloc.llm.loader import load_engine
    from mloc.spec.base import ModelSpec

    hub.hub.add_folder(REPO, tiny_model)
    spec = ModelSpec.model_validate({"source": {"type": "huggingface", "identifier": REPO}, "engine": "transformers"})
    cache = EngineCache()
    for name, value in fetcher_env(hub).items():
        monkeypatch.setenv(name, value)
    load_engine(spec, models_dir=tmp_path, cache=cache)
    entry = hub_entry(tmp_path, REPO)
    # While the engine is warm, this process's use lock keeps the files from another process's eviction.
    assert not _free_to_evict(entry.use_lock)
    cache.clear()
    assert _free_to_evict(entry.use_lock)


def _free_to_evict(lock: Path) -> bool:
    """Whether an exclusive lock on ``lock`` (what eviction takes) is granted now, from another process."""
    probe = "import fcntl,sys; h=open(sys.argv[1],'a'); fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- several processes

FETCHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mloc.llm.modelsource import resolve_model
    from mloc.spec.base import ModelSource

    print(resolve_model(ModelSource(identifier=sys.argv[1]), Path(sys.argv[2])), flush=True)
    """
)


def fetcher_env(hub: HubServer) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "MLOC_OFFLINE": "0", "MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES": "0"}


def test_two_processes_wanting_one_model_download_it_once(hub: HubServer, tmp_path: Path) -> None:
    hub.hub.add_repo(REPO, fake_model(2 * MB))
    hub.hub.bytes_per_sec = 4 * MB
    command = [sys.executable, "-c", FETCHER, REPO, str(tmp_path)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=fetcher_env(hub)) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1] and Path(outputs[0]).is_dir()
    assert len(weights_gets(hub)) == 1


def test_a_killed_download_resumes_in_the_next_process(hub: HubServer, tmp_path: Path) -> None:
    files = fake_model(4 * MB)
    commit = hub.hub.add_repo(REPO, files)
    hub.hub.bytes_per_sec = 2 * MB
    part = hub_entry(tmp_path, REPO).path / f".{commit}.partial" / "model.safetensors.part"
    proc = subprocess.Popen([sys.executable, "-c", FETCHER, REPO, str(tmp_path)], env=fetcher_env(hub),
                            stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > MB):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = part.stat().st_size
    assert 0 < kept < len(files["model.safetensors"])

    hub.hub.bytes_per_sec = None
    folder = resolve_model(model_source(REPO), tmp_path, options=options(hub))
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert weights_gets(hub)[-1].headers["range"] == f"bytes={kept}-"


# --------------------------------------------------------------------------- URLs


def test_an_https_gguf_resumes_and_starts_again_when_the_file_changed(hub: HubServer, tmp_path: Path) -> None:
    data = os.urandom(3 * MB)
    hub.hub.files["m.gguf"] = data
    hub.hub.drops = 1
    url = f"{hub.url}/files/m.gguf"
    path = fetch_url(url, tmp_path, options(hub))
    assert path.name == "m.gguf" and path.read_bytes() == data
    gets = hub.hub.seen("GET", "/files/")
    assert [g.headers.get("range") for g in gets] == [None, f"bytes={len(data) // 2}-"]
    assert gets[1].headers["if-range"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert held_models(tmp_path) == [url]

    # A part of an older version of the file: If-Range does not match, the server sends it all.
    other = f"{hub.url}/files/n.gguf"
    new = os.urandom(MB)
    hub.hub.files["n.gguf"] = new
    dest = url_entry(tmp_path, other)
    dest.path.mkdir(parents=True)
    (dest.path / "n.gguf.part").write_bytes(b"old" * 1000)
    (dest.path / "n.gguf.part.json").write_text(json.dumps({"validator": '"an-old-etag"'}))
    assert fetch_url(other, tmp_path, options(hub)).read_bytes() == new

    with pytest.raises(ExecutionError, match=r"does not name a \.gguf file"):
        fetch_url(f"{hub.url}/files/model.bin", tmp_path, options(hub))


def test_url_sources_are_typed_by_their_scheme_and_read_no_local_path() -> None:
    assert ModelSource(identifier="https://example.com/m.gguf").type == SourceType.URL
    assert ModelSource(identifier="s3://bucket/models/tiny/").type == SourceType.URL
    assert ModelSource(type=SourceType.HUGGINGFACE, identifier="org/name", revision="v1").revision == "v1"
    for bad in (
        {"type": "huggingface", "identifier": "s3://bucket/x.gguf"},
        {"type": "url", "identifier": "file:///etc/passwd"},
        {"type": "url", "identifier": "/models/x.gguf"},
        {"type": "url", "identifier": "https://example.com/m.gguf", "revision": "main"},
    ):
        with pytest.raises(ValueError, match="source"):
            ModelSource.model_validate(bad)
    spec = {"model": {"source": {"type": "url", "identifier": "s3://bucket/models/tiny"}}}
    assert references(spec) == []


@pytest.mark.extra("s3")
def test_s3_gguf_and_model_folder_through_an_s3_compatible_server(tmp_path: Path) -> None:
    import boto3

    with s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="models")
        gguf = os.urandom(2 * MB)
        s3.put_object(Bucket="models", Key="one/m.gguf", Body=gguf)
        for name, data in fake_model(MB).items():
            s3.put_object(Bucket="models", Key=f"tiny/{name}", Body=data)
        s3.put_object(Bucket="models", Key="tiny/onnx/model.onnx", Body=b"skipped")
        storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fetch = FetchOptions(min_free_bytes=0, storage_options=storage)

        assert fetch_url("s3://models/one/m.gguf", tmp_path, fetch).read_bytes() == gguf
        folder = resolve_model(model_source("s3://models/tiny"), tmp_path, options=fetch)
        assert sorted(p.name for p in folder.iterdir() if p.name[0] != ".") == sorted(fake_model(MB))
        assert resolve_model(model_source("s3://models/tiny"), tmp_path, options=fetch) == folder
        assert held_models(tmp_path) == ["s3://models/one/m.gguf", "s3://models/tiny"]
        with pytest.raises(ExecutionError, match="not found"):
            fetch_url("s3://models/none.gguf", tmp_path, fetch)
        release_all()


# --------------------------------------------------------------------------- fidelity of the stand-in


def test_huggingface_hub_itself_downloads_from_the_stand_in_hub(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, snapshot_download

    files = fake_model(MB)
    hub.hub.add_repo(REPO, files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = Path(snapshot_download(REPO, cache_dir=tmp_path, endpoint=hub.url))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


# --------------------------------------------------------------------------- end to end


def test_an_inference_task_on_a_hub_id_downloads_the_model_on_the_worker(
    hub: HubServer,
    tiny_model: Path,
    tmp_path: Path,
    make_cluster: Callable[..., LocalCluster],
    client_for: Callable[..., Client],
) -> None:
    hub.hub.add_folder(REPO, tiny_model)
    worker_env = {
        "HF_ENDPOINT": hub.url,
        "MLOC_OFFLINE": "0",
        "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"),
        "MLOC_MODELS_DIR": str(tmp_path / "models"),
        "MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES": "0",
        "HEARTBEAT_INTERVAL_SEC": "0.5",
    }
    client = client_for(make_cluster(1, worker_env=[worker_env]))
    task = {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "spec": {
            "taskType": "inference",
            "model": {"source": {"type": "huggingface", "identifier": REPO}, "engine": "transformers"},
            "inference": {"prompts": ["Hello"], "max_tokens": 3, "temperature": 0},
        },
    }
    task_id = client.submit(json.dumps(task).encode())["task_id"]
    record = client.wait(task_id, timeout=300)
    assert record["state"] == "succeeded", record
    result = client.result(task_id)
    assert result["model"] == REPO and result["items"][0]["completion_tokens"] == 3
    assert len(weights_gets(hub)) == 1
    assert held_models(tmp_path / "models") == [REPO]
    # The worker's heartbeat says so, and the scheduler prefers it for the next task on that model.
    deadline = time.monotonic() + 30
    while REPO not in client.workers()["items"][0]["held_models"]:
        assert time.monotonic() < deadline, client.workers()
        time.sleep(0.2)
