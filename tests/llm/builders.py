"""Test models beyond the tiny base: LoRA adapters, and where the bundled Gemma is cached between runs."""

from __future__ import annotations

import os
from pathlib import Path

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
