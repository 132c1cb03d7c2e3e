"""Find and load the models a training task names: the policy, its tokenizer, reward and value models.

This module imports torch and transformers at the top: only the executors' ``run`` imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mloc.errors import ExecutionError
from mloc.llm.modelsource import find_packaged, resolve_model
from mloc.spec.base import ModelSource, SourceType, is_url

# The libraries stay off the hub: MLOC downloads what a task names (mloc.llm.fetch) before they load it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    cuda: bool
    bf16: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def label(self) -> str:
        return f"cuda x{torch.cuda.device_count()} ({'bf16' if self.bf16 else 'fp32'})" if self.cuda else "cpu"


def detect_device() -> Device:
    cuda = torch.cuda.is_available()
    return Device(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def resolve_named_model(identifier: str, models_dir: Path, field: str) -> Path:
    """A reward or value model given as a string: a packaged model's name, an existing folder, else a
    cached hub id."""
    local = Path(identifier).expanduser()
    if find_packaged(identifier) is not None:
        kind = SourceType.PACKAGE
    elif is_url(identifier):
        kind = SourceType.URL
    else:
        kind = SourceType.LOCAL if local.exists() else SourceType.HUGGINGFACE
    try:
        return resolve_model(ModelSource(type=kind, identifier=identifier), models_dir)
    except ExecutionError as exc:
        raise ExecutionError(f"hyperparameters.{field}: {exc.message}") from exc


def load_config(path: Path, what: str) -> Any:
    """The model's config, read in milliseconds: the first check that a folder holds a usable model."""
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ExecutionError(f"{what} at {path} could not be loaded: {exc}") from exc


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ExecutionError(f"the tokenizer of {path} could not be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        # Batched training pads; models without a pad token (Llama, Mistral) reuse EOS for it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, device: Device, quantization: Any = None) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": device.dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if device.cuda:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:
        raise ExecutionError(
            f"loading {path} needs a library this worker lacks: {exc}. For QLoRA install bitsandbytes "
            "(pip install 'mloc[qlora]')"
        ) from exc
    except Exception as exc:
        raise ExecutionError(f"the model at {path} could not be loaded: {exc}") from exc


def load_score_model(path: Path, device: Device, what: str) -> PreTrainedModel:
    """A sequence-classification model with one output: a reward model, or the start of a value model."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=device.dtype)
    except Exception as exc:
        raise ExecutionError(
            f"{what} at {path} could not be loaded as a sequence-classification model with one output "
            f"(a reward model): {exc}"
        ) from exc
    if model.config.pad_token_id is None:
        # Scoring finds each sequence's last token through the pad id.
        tokenizer = load_tokenizer(path)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def linear_module_names(config: Any) -> set[str]:
    """Names of the model's Linear layers, from its config on the meta device (no weights are read)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}
