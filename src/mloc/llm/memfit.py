"""How much memory a task needs, from its spec and the model's architecture, before anything is loaded.

It runs where admission runs (the orchestrator), so it reads a model's ``config.json`` (or a GGUF file's
header) and never imports torch: :func:`~mloc.llm.modelfacts.model_facts` turns either into
:class:`ModelFacts`, and :func:`estimate_task` turns a task plus those facts into an :class:`Estimate`
with its parts. Where MLOC itself sizes something (vLLM's context and CPU KV cache in
:mod:`mloc.llm.loader`), the same rule is called here rather than copied. The figures describe MLOC's
own engines: vLLM, transformers (with lm-eval's HFLM over it for eval tasks), and TRL 1.x trainers (whose
log-probabilities come from a chunked LM head, so full logits are never held).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from mloc.llm.estimate import TOKENIZER_BYTES_PER_TOKEN, Device, Estimate, Target, replace_estimate
from mloc.llm.inference_memory import eval_estimate, inference_estimate
from mloc.llm.loader import DTYPE_BYTES
from mloc.llm.modelfacts import ModelFacts, ModelFactsError, model_facts
from mloc.llm.training_memory import training_estimate
from mloc.spec.agent import AgentSpec
from mloc.spec.base import Document
from mloc.spec.eval import EvalSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.rag import RagSpec
from mloc.spec.train import DPOSpec, GRPOSpec, PPOSpec, SFTSpec

__all__ = ["Device", "Estimate", "ModelFacts", "ModelFactsError", "estimate_task", "model_facts"]


def estimate_task(
    document: Document,
    facts: ModelFacts,
    *,
    device: Device = "gpu",
    bf16: bool | None = None,
    auto_engine: Literal["vllm", "transformers"] = "vllm",
    others: Mapping[str, ModelFacts] | None = None,
) -> Estimate:
    """The memory ``document``'s task needs with the model ``facts`` describe.

    ``device`` is where it would run; ``bf16`` whether that device computes in bfloat16 (default: GPUs
    do, CPUs do not: MLOC computes in float32 on a CPU without native bfloat16). ``auto_engine`` is the
    engine ``model.engine: auto`` gets (vLLM where the worker has it). ``others`` holds the facts of the
    other models a task names (reward, value, embedding models) by the identifier the task gives; a
    model missing there is assumed the size of the task's own, and the estimate says so in its notes.
    """
    target = Target(device, device == "gpu" if bf16 is None else bf16, auto_engine, others or {})
    spec = document.spec
    if isinstance(spec, InferenceSpec | RagSpec | AgentSpec):
        estimate = inference_estimate(spec, facts, target)
    elif isinstance(spec, EvalSpec):
        estimate = eval_estimate(spec, facts, target)
    elif isinstance(spec, SFTSpec | DPOSpec | GRPOSpec | PPOSpec):
        estimate = training_estimate(spec, facts, target)
    else:
        raise ModelFactsError(
            f"task type {spec.task_type!r} loads no model MLOC can size; its memory is what "
            "spec.resources.hardware says"
        )
    return _in_ram(estimate, facts) if device == "cpu" else estimate


def _in_ram(estimate: Estimate, facts: ModelFacts) -> Estimate:
    """On a CPU the tokenizer shares the memory, and a load that converts the checkpoint's dtype peaks at
    the converted weights plus the checkpoint's pages (the file is mapped while it is read)."""
    tokenizer = facts.vocab_size * TOKENIZER_BYTES_PER_TOKEN
    loading = 0
    stored = facts.parameters * DTYPE_BYTES["bfloat16"] if facts.format == "gguf" else sum(facts.weight_bytes.values())
    stored_dtype = "bfloat16" if facts.format == "gguf" else facts.dtype
    converts = estimate.dtype not in ("", "nf4", stored_dtype)
    if converts and (facts.quantization is None or facts.format == "gguf"):
        # The tokenizer is loaded first; the running parts come after the load.
        loading = max(0, estimate.weights + stored + estimate.overhead - estimate.total)
    return replace_estimate(estimate, tokenizer=tokenizer, loading=loading)
