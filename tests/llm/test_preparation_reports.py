"""What a worker tells a task while it gets its model ready: a GGUF conversion or an engine start says when it
begins and ends in the task's log, a cancel stops between conversion stages, and a host it cannot reach
fails with what to change. Real GGUF files, real conversions, real engines, a real closed port."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

import mloc.spec
from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.base import Event, RunContext
from mloc.executors.inference import InferenceExecutor
from mloc.llm.fetch import FetchOptions
from mloc.llm.modelsource import CONVERTED_DIR, MARKER, resolve_model
from mloc.spec.base import ModelSource, SourceType

pytestmark = pytest.mark.extra("inference")

# A port nothing listens on: a connection to it is refused at once.
CLOSED = "http://127.0.0.1:1"


def write_tiny_gguf(path: Path) -> Path:
    """A Llama GGUF of random float32 weights and a byte-level tokenizer: transformers reads it in a second."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, heads, ffn = 64, 4, 128
    tokens = [*bytes_to_unicode().values(), "he", "<|end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last is a control token
    writer.add_token_merges(["h e"])  # transformers wants merges (or scores) for a byte-level vocabulary
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden)}
    shapes |= {f"blk.0.{name}.weight": (hidden, hidden) for name in ("attn_q", "attn_k", "attn_v", "attn_output")}
    shapes |= {"blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden)}
    shapes |= {"blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def local(path: Path) -> ModelSource:
    return ModelSource(type=SourceType.LOCAL, identifier=str(path))


def test_a_gguf_conversion_logs_its_start_and_end_and_reports_each_stage(tiny_gguf: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    stages: list[str] = []
    folder = resolve_model(
        local(tiny_gguf), tmp_path, on_log=logs.append, on_progress=lambda done, total, message: stages.append(message)
    )
    assert (folder / MARKER).is_file()
    expected = [
        "preparing tiny: reading the tokenizer",
        "preparing tiny: reading and dequantizing the weights (the longest stage)",
        "preparing tiny: writing the Hugging Face folder",
    ]
    assert stages == expected
    assert len(logs) == 5, logs
    assert logs[0] == f"preparing GGUF model {tiny_gguf} for the engines (once per host; it may take minutes)"
    assert logs[1:4] == expected
    assert logs[4].startswith(f"prepared GGUF model {tiny_gguf} in ") and logs[4].endswith("s")
    # Converted once per host: the next task finds the folder and has nothing to say.
    logs.clear()
    assert resolve_model(local(tiny_gguf), tmp_path, on_log=logs.append) == folder
    assert logs == []


def test_a_cancel_during_a_conversion_stops_at_the_next_stage_and_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    cancelled = threading.Event()

    def check_cancelled() -> None:
        if cancelled.is_set():
            raise TaskCancelled("the task was cancelled")

    def on_progress(done: int, total: int | None, message: str) -> None:
        cancelled.set()  # the user cancels while the tokenizer is read

    # A cancel, not "could not read the GGUF model": the stage checks stay outside the reader's error handling.
    with pytest.raises(TaskCancelled):
        resolve_model(local(tiny_gguf), tmp_path, on_progress=on_progress, check_cancelled=check_cancelled)
    leftovers = [path.name for path in (tmp_path / CONVERTED_DIR).iterdir() if not path.name.endswith(".lock")]
    assert leftovers == []


def test_a_packaged_model_built_on_first_use_says_so(tmp_path: Path) -> None:
    logs: list[str] = []
    resolve_model(ModelSource(type=SourceType.PACKAGE, identifier="mloc-tiny-llama"), tmp_path, on_log=logs.append)
    assert logs[:2] == [
        "preparing packaged model mloc-tiny-llama for the engines (once per host; it may take minutes)",
        "preparing mloc-tiny-llama: building it",
    ]
    assert len(logs) == 3 and logs[2].startswith("prepared packaged model mloc-tiny-llama in ")


def document(model: dict[str, Any], **inference: Any) -> mloc.spec.Document:
    spec = {"taskType": "inference", "model": model, "inference": inference}
    body = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "t"}, "spec": spec}
    return mloc.spec.load(yaml.safe_dump(body))


def run(executor: InferenceExecutor, doc: mloc.spec.Document, out_dir: Path, models_dir: Path) -> list[Event]:
    events: list[Event] = []
    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=doc,
        out_dir=out_dir,
        models_dir=models_dir,
        worker_id="w1",
        emit=events.append,
    )
    executor.run(ctx)
    return events


def test_the_task_log_follows_the_conversion_and_the_engine_start(tiny_gguf: Path, tmp_path: Path) -> None:
    executor = InferenceExecutor()
    model = {"source": {"type": "local", "identifier": str(tiny_gguf)}, "engine": "transformers"}
    doc = document(model, prompts=["hello"], max_tokens=2)
    try:
        events = run(executor, doc, tmp_path / "one", tmp_path / "models")
        logs = [event["message"] for event in events if event["ev"] == "log"]
        assert len(logs) == 7, logs
        assert logs[0].startswith(f"preparing GGUF model {tiny_gguf} for the engines")
        assert logs[1:4] == [
            "preparing tiny: reading the tokenizer",
            "preparing tiny: reading and dequantizing the weights (the longest stage)",
            "preparing tiny: writing the Hugging Face folder",
        ]
        assert logs[4].startswith(f"prepared GGUF model {tiny_gguf} in ")
        assert logs[5].startswith(f"starting the transformers engine for {tiny_gguf} (")
        assert logs[6].startswith(f"transformers engine for {tiny_gguf} ready in ")
        # While it prepares, the task's progress says what it is doing rather than nothing (RunContext passes
        # on a few reports a second, so of quick stages only the first is sure to show).
        messages = [event["message"] for event in events if event["ev"] == "progress"]
        assert messages[0] == "preparing tiny: reading the tokenizer"
        # The next task on this executor finds the engine warm.
        events = run(executor, doc, tmp_path / "two", tmp_path / "models")
        logs = [event["message"] for event in events if event["ev"] == "log"]
        assert logs == [f"reusing warm transformers engine for {tiny_gguf}"]
    finally:
        executor.close()


def test_an_unreachable_hub_says_how_to_get_the_model_another_way(tmp_path: Path) -> None:
    options = FetchOptions(hf_endpoint=CLOSED, min_free_bytes=0)
    with pytest.raises(ExecutionError) as caught:
        resolve_model(ModelSource(identifier="mloc-test/absent"), tmp_path, options=options)
    message = caught.value.message
    assert message.startswith(f"could not reach the hub at {CLOSED} (ConnectError: ")
    assert "; check that HF_ENDPOINT on the worker names a hub mirror it can reach" in message
    assert "Hugging Face cache (HF_HUB_CACHE)" in message and "source.type local" in message


def test_an_unreachable_url_says_what_to_check_and_what_to_do_instead(tmp_path: Path) -> None:
    url = f"{CLOSED}/model.gguf"
    options = FetchOptions(min_free_bytes=0)
    with pytest.raises(ExecutionError) as caught:
        resolve_model(ModelSource(identifier=url), tmp_path, options=options)
    message = caught.value.message
    assert message.startswith(f"could not reach {url} (ConnectError: ")
    assert "check that the URL is right and reachable from the worker" in message
    assert "download the file onto the worker and use source.type local" in message
