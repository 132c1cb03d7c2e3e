"""Test models beyond the tiny base: LoRA adapters, and where the bundled Gemma is cached between runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mloc.llm.base import LLMEngine
from mloc.llm.loader import Workload, build_engine, plan_load
from mloc.llm.modelsource import stop_token_ids_for
from mloc.spec.base import ModelSpec

# vLLM's CPU attention kernels take head sizes of 32 and up; 256 / 4 heads = 64 fits, 64 / 4 = 16 does not.
TINY_HIDDEN = 256


def persistent_models_dir() -> Path:
    """A models dir that outlives one test run, so the Gemma conversion (minutes) happens once."""
    configured = os.environ.get("MLOC_TEST_MODELS_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "mloc-test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_lora(base: Path, out: Path, *, rank: int = 8, seed: int = 1) -> Path:
    """Save a LoRA adapter for ``base`` whose B weights are non-zero, so it changes what the model says."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


def gemma(**vllm: object) -> ModelSpec:
    """The bundled Gemma 3 270M on vLLM, without compiled graphs (they take minutes to build on a CPU)."""
    return ModelSpec.model_validate(
        {
            "source": {"type": "package", "identifier": "gemma3-270m"},
            "engine": "vllm",
            "vllm": {"enforce_eager": True, **vllm},
        }
    )


def started(model: ModelSpec, models_dir: Path, workload: Workload) -> Iterator[tuple[LLMEngine, int]]:
    """An engine loaded as MLOC plans it for ``workload``, with the KV cache it planned; closed after."""
    plan = plan_load(model, models_dir=models_dir, workload=workload)
    engine = build_engine(plan, models_dir=models_dir, stop_token_ids=stop_token_ids_for(model.source))
    try:
        yield engine, plan.kv_cache_bytes
    finally:
        engine.close()
