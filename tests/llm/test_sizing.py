"""How an engine is sized to a task before it loads (context, KV cache, dtype) and when a warm engine
serves a new task: plain arithmetic on model configs, no model loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from mloc.errors import ExecutionError
from mloc.llm import loader
from mloc.llm.loader import (
    CONTEXT_FLOOR,
    DTYPE_BYTES,
    KV_BLOCK_TOKENS,
    KV_CAP_BYTES,
    KV_FLOOR_BYTES,
    LoadPlan,
    ModelShape,
    Workload,
    choose_context,
    choose_dtype,
    kv_cache_bytes,
    plan_load,
)
from mloc.llm.vllm_engine import vllm_flavour
from mloc.spec.base import ModelSpec
from mloc.spec.sampling import InferenceInput

# Gemma 3 270M as its config.json has it: 18 layers, one KV head of 256 dimensions.
GEMMA_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "dtype": "bfloat16",
    "head_dim": 256,
    "hidden_size": 640,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
}
GEMMA_BF16_TOKEN = 2 * 18 * 1 * 256 * 2  # K and V, every layer, 2 bytes each: 18 KiB a token


def write_config(folder: Path, config: Mapping[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture
def gemma(tmp_path: Path) -> ModelShape:
    return ModelShape.read(write_config(tmp_path / "gemma", GEMMA_CONFIG))


def test_model_shape_reads_dtype_context_and_kv_size_from_the_config(gemma: ModelShape, tmp_path: Path) -> None:
    assert gemma == ModelShape("bfloat16", 32768, 2 * 18 * 256)
    # A multimodal config keeps the language model under text_config; head_dim may be left implicit.
    nested = {
        "torch_dtype": "float16",
        "text_config": {
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_hidden_layers": 32,
            "max_position_embeddings": 8192,
        },
    }
    assert ModelShape.read(write_config(tmp_path / "mm", nested)) == ModelShape("float16", 8192, 2 * 32 * 8 * 128)
    assert ModelShape.read(tmp_path / "no-such-folder") == ModelShape("float32", None, None)


def test_workload_bounds_tokens_by_utf8_bytes_plus_template_overhead() -> None:
    work = Workload.of(["short", "é" * 10], max_tokens=32, sequences=3)
    assert work == Workload(context=20 + 8 + 32, sequences=3)
    inputs = InferenceInput.model_validate(
        {
            "prompts": ["Question: why?\nAnswer:"] * 300,
            "messages": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
            "max_tokens": 16,
            "n": 2,
        }
    )
    # The longest text, plus room for the template of a two-turn chat; 301 requests, 256 per engine
    # call, 2 completions each.
    longest = len("Question: why?\nAnswer:") + 8 + loader.CHAT_TURN_TOKENS * 2 + 16
    assert Workload.of_inference(inputs, batch_size=256) == Workload(longest, 512)


def test_context_is_what_the_task_needs_rounded_up_within_the_floor_and_the_model(gemma: ModelShape) -> None:
    assert choose_context(gemma, Workload(120, 4)) == CONTEXT_FLOOR
    assert choose_context(gemma, Workload(5000, 1)) == 5120
    assert choose_context(gemma, Workload(100_000, 1)) == 32768
    # Without a stated need the model's own context stays (vLLM's default), e.g. for an agent's growing chat.
    assert choose_context(gemma, None) == 32768


def test_kv_cache_holds_the_tasks_sequences_between_the_floor_and_the_cap(gemma: ModelShape) -> None:
    # Four short prompts: one full-context sequence is 36 MiB, so the floor applies.
    assert kv_cache_bytes(gemma, "bfloat16", 2048, Workload(120, 4)) == KV_FLOOR_BYTES
    # 256 short prompts at once, each in one 128-token block: 576 MiB, above the floor.
    assert kv_cache_bytes(gemma, "bfloat16", 2048, Workload(100, 256)) == 256 * KV_BLOCK_TOKENS * GEMMA_BF16_TOKEN
    # float32 doubles it.
    assert kv_cache_bytes(gemma, "float32", 2048, Workload(100, 256)) == 2 * 256 * KV_BLOCK_TOKENS * GEMMA_BF16_TOKEN
    # A sequence is counted at most at the engine's context.
    assert kv_cache_bytes(gemma, "bfloat16", 2048, Workload(9000, 64)) == 64 * 2048 * GEMMA_BF16_TOKEN
    # Thousands of long sequences stop at the cap.
    cap = min(KV_CAP_BYTES, int(loader.total_ram_bytes() * loader.KV_CAP_RAM_SHARE))
    assert kv_cache_bytes(gemma, "bfloat16", 8192, Workload(8000, 4096)) == cap


def test_kv_cache_always_holds_one_full_context_sequence(tmp_path: Path) -> None:
    # 1 MiB a token: one 8192-token sequence needs 8 GiB, past the cap; vLLM would refuse to start on less.
    huge = {**GEMMA_CONFIG, "num_hidden_layers": 64, "num_key_value_heads": 16, "head_dim": 256}
    shape = ModelShape.read(write_config(tmp_path / "huge", huge))
    assert kv_cache_bytes(shape, "float32", 8192, Workload(100, 1)) == 8192 * 2 * 64 * 16 * 256 * 4


def test_dtype_is_the_tasks_else_the_checkpoints_where_the_cpu_computes_in_it_else_float32() -> None:
    for native in (True, False):
        assert choose_dtype("float32", "bfloat16", on_gpu=False, native_bf16=native) == "float32"
        assert choose_dtype("half", "bfloat16", on_gpu=False, native_bf16=native) == "float16"
        assert choose_dtype(None, "bfloat16", on_gpu=True, native_bf16=native) == "auto"
        assert choose_dtype(None, "float32", on_gpu=False, native_bf16=native) == "float32"
        assert choose_dtype(None, "float16", on_gpu=False, native_bf16=native) == "float32"
    assert choose_dtype(None, "bfloat16", on_gpu=False, native_bf16=True) == "bfloat16"
    assert choose_dtype("auto", "bfloat16", on_gpu=False, native_bf16=True) == "bfloat16"
    assert choose_dtype(None, "bfloat16", on_gpu=False, native_bf16=False) == "float32"


def plan(path: Path, *, context: int | None = 2048, needed: int | None = None, **fields: object) -> LoadPlan:
    options = {"max_model_len": context, "enforce_eager": True, **fields.pop("options", {})}  # type: ignore[dict-item]
    values: dict[str, object] = {
        "engine": "vllm",
        "model_id": "gemma3-270m",
        "path": path,
        "options": options,
        "lora_rank": None,
        "weights_bytes": 1,
        "memory_bytes": 1,
        "dtype": "bfloat16",
        "on_gpu": False,
        "needed_context": needed,
        **fields,
    }
    return LoadPlan(**values)  # type: ignore[arg-type]


def test_a_warm_engine_serves_a_task_of_the_same_model_dtype_and_no_longer_context(tmp_path: Path) -> None:
    warm = plan(tmp_path, context=2048, options={"kv_cache_memory_bytes": KV_FLOOR_BYTES})
    # A RAG task that set nothing: its prompts need 950 tokens; its own engine would be sized differently.
    assert plan(tmp_path, context=2048, needed=950, options={"kv_cache_memory_bytes": 1 << 30}).served_by(warm)
    assert not plan(tmp_path, context=4096, needed=3000).served_by(warm)
    assert not plan(tmp_path, needed=950, dtype="float32").served_by(warm)
    assert not plan(tmp_path / "other", needed=950).served_by(warm)
    assert not plan(tmp_path, needed=950, engine="transformers").served_by(warm)
    # Options the task wrote itself must match; ones it left unset need not.
    assert not plan(tmp_path, needed=950, requested={"enforce_eager": False}).served_by(warm)
    assert plan(tmp_path, needed=950, requested={"enforce_eager": True, "max_model_len": 1024}).served_by(warm)
    # An explicit max_model_len is a need like any other: a longer warm context serves it.
    assert plan(tmp_path, context=1024, requested={"max_model_len": 1024}).served_by(warm)
    # LoRA: the warm engine must take adapters of the task's rank.
    assert not plan(tmp_path, needed=950, lora_rank=16).served_by(warm)
    assert plan(tmp_path, needed=950, lora_rank=16).served_by(plan(tmp_path, lora_rank=32))


@pytest.mark.extra("vllm")
def test_a_vllm_cpu_plan_carries_the_context_and_kv_cache_sized_to_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if vllm_flavour() != "cpu":
        pytest.skip("the KV cache is sized on vllm-cpu; vLLM on GPUs takes gpu_memory_utilization")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    folder = write_config(tmp_path / "gemma", GEMMA_CONFIG)
    short_prompts = Workload(100, 256)

    def planned(workload: Workload | None = short_prompts, **vllm: object) -> LoadPlan:
        source = {"type": "local", "identifier": str(folder)}
        model = ModelSpec.model_validate({"source": source, "engine": "vllm", "vllm": vllm})
        return plan_load(model, models_dir=tmp_path / "models", workload=workload)

    plan = planned()
    token = 2 * 18 * 256 * DTYPE_BYTES[plan.dtype]
    assert plan.options["max_model_len"] == CONTEXT_FLOOR and plan.needed_context == 100
    assert plan.options["kv_cache_memory_bytes"] == plan.kv_cache_bytes == 256 * KV_BLOCK_TOKENS * token
    assert plan.memory_bytes > plan.kv_cache_bytes
    # What the task sets itself is kept: its context, its KV cache, its dtype.
    own = planned(max_model_len=4096, kv_cache_memory_bytes=1 << 30, dtype="float32")
    assert own.options["max_model_len"] == own.needed_context == 4096
    assert own.kv_cache_bytes == 1 << 30 and own.dtype == own.options["dtype"] == "float32"
    # No stated need: the model's own context, and room for one sequence of it.
    assert planned(None).options["max_model_len"] == 32768
    # An operator's VLLM_CPU_KVCACHE_SPACE wins over the sizing (vLLM reads it last).
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    fixed = planned()
    assert fixed.kv_cache_bytes == 1 << 30 and "kv_cache_memory_bytes" not in fixed.options
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2.5")
    with pytest.raises(ExecutionError, match=r"VLLM_CPU_KVCACHE_SPACE is '2.5'.*whole number of GiB"):
        planned()
