"""Turn ``model.adapter`` into PEFT configuration, and check it against the model before training.

This module imports peft and transformers at the top: only the executors' ``run`` imports it.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import BitsAndBytesConfig

from mloc.errors import ExecutionError
from mloc.executors.train.models import Device
from mloc.spec.base import Adapter, AdapterType


def check_adapter_type(adapter: Adapter | None) -> None:
    if adapter is not None and adapter.type not in (AdapterType.LORA, AdapterType.QLORA):
        raise ExecutionError(
            f"model.adapter.type {adapter.type!r} is not supported for training; use 'lora' or 'qlora', "
            "or leave out model.adapter for full fine-tuning"
        )


def check_qlora_available() -> None:
    try:
        found = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # a broken or shadowed install counts as missing
        found = False
    if not found:
        raise ExecutionError(
            "model.adapter.type 'qlora' loads the model in 4 bits, which needs bitsandbytes; this worker "
            "lacks it: pip install 'mloc[qlora]' on the worker, or use adapter type 'lora'"
        )


def quantization_config(device: Device) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantization, as in the QLoRA paper; compute in bf16 where the GPU has it."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.bf16 else torch.float32,
    )


def linear4bit_layers(model: Any) -> int:
    """How many of the model's layers bitsandbytes holds in 4 bits; 0 means the load was not quantized."""
    import bitsandbytes as bnb

    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def _suffixes(names: set[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def target_modules(adapter: Adapter, config: Any, linear_names: set[str]) -> list[str] | str:
    """The modules LoRA wraps: the ones asked for (each must exist), else PEFT's default for the model."""
    wanted = adapter.target_modules
    if wanted == "all-linear":
        return "all-linear"
    if wanted is None:
        known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(config, "model_type", ""))
        # An architecture PEFT has no default for still trains: every linear layer gets an adapter.
        return list(known) if known else "all-linear"
    if not wanted:
        raise ExecutionError("model.adapter.target_modules is empty; name modules, use 'all-linear' or leave it out")
    missing = []
    for target in wanted:
        # PEFT matches a module whose full name is the target or ends with ".<target>".
        pattern = re.compile(rf"(^|\.){re.escape(target)}$")
        if not any(pattern.search(name) for name in linear_names):
            missing.append(target)
    if missing:
        raise ExecutionError(
            f"model.adapter.target_modules {missing} are not linear layers of this model; it has: "
            f"{', '.join(_suffixes(linear_names))} (or use 'all-linear')"
        )
    return list(wanted)


def lora_config(adapter: Adapter, config: Any, linear_names: set[str]) -> LoraConfig:
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        target_modules=target_modules(adapter, config, linear_names),
        bias="none",
        task_type="CAUSAL_LM",
    )
