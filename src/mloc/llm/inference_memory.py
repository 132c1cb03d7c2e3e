"""The memory an inference task needs (plain, RAG, agent), on vLLM or transformers, on a GPU or a CPU, and
an eval task's, which lm-eval runs on transformers."""

from __future__ import annotations

import math

from mloc.llm.estimate import (
    CPU_RUNTIME_BYTES,
    DEFAULT_BATCH,
    EVAL_CUSTOM_NEW_TOKENS,
    EVAL_HARNESS_NEW_TOKENS,
    GPU_CONTEXT_BYTES,
    MINILM_PARAMETERS,
    UNKNOWN_PROMPT_TOKENS,
    VLLM_BATCHED_TOKENS,
    VLLM_CPU_FIRST_START_BYTES,
    VLLM_GRAPH_BYTES,
    VLLM_MAX_SEQS,
    Estimate,
    Target,
    likely_tokens,
    replace_estimate,
    value_bytes,
)
from mloc.llm.loader import (
    CHAT_TURN_TOKENS,
    CONTEXT_FLOOR,
    DTYPE_NAMES,
    VLLM_CPU_WEIGHT_COPIES,
    Workload,
    choose_context,
    choose_dtype,
    kv_cache_bytes,
)
from mloc.llm.modelfacts import ModelFacts
from mloc.spec.agent import AgentSpec
from mloc.spec.base import Engine, ModelSpec
from mloc.spec.eval import CustomType, EvalSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.rag import RagSpec


def _text_bytes(*texts: str) -> int:
    return sum(len(text.encode()) for text in texts)


def _inference_workload(spec: InferenceSpec | RagSpec | AgentSpec, batch: int) -> Workload | None:
    """What the executor will ask of the engine, bounded as the loader bounds it (a token is at least a byte)."""
    if isinstance(spec, InferenceSpec):
        return None if spec.inference.input is not None else Workload.of_inference(spec.inference, batch)
    if isinstance(spec, RagSpec):
        options = spec.hyperparameters
        frame = options.prompt_template or options.system_prompt
        # Every retrieved chunk in the prompt, as the RAG executor's own bound does. Questions read from a
        # dataset are unknown at submit, as a dataset's prompts are.
        question = max((_text_bytes(q) for q in spec.questions), default=UNKNOWN_PROMPT_TOKENS)
        prompt = _text_bytes(frame) + question + options.retrieval_k * (options.chunk_size + 32)
        sequences = min(len(spec.questions) or batch, batch) * spec.inference.n
        return Workload(prompt + 16 + 2 * CHAT_TURN_TOKENS + spec.inference.max_tokens, sequences)
    # An agent's conversation grows by a reply and a tool result each step.
    agent = spec.hyperparameters
    start = _text_bytes(agent.system_prompt, spec.input or "", *(m.content for m in spec.messages))
    turns = len(spec.messages) + 2 + 2 * agent.max_steps
    grown = start + agent.max_steps * (spec.inference.max_tokens + UNKNOWN_PROMPT_TOKENS)
    return Workload(grown + CHAT_TURN_TOKENS * turns + spec.inference.max_tokens, spec.inference.n)


def inference_estimate(spec: InferenceSpec | RagSpec | AgentSpec, facts: ModelFacts, target: Target) -> Estimate:
    # A task without a model runs the worker's default (VLLM_MODEL), which ``facts`` describe.
    model = spec.model or ModelSpec.model_validate({"source": {"identifier": "worker-default"}})
    engine = target.engine if model.engine == Engine.AUTO else model.engine.value
    batch = getattr(getattr(spec, "inference", None), "batch_size", None) or DEFAULT_BATCH[engine]
    bound = _inference_workload(spec, batch)
    notes: list[str] = []
    typical = None
    if bound is None:
        notes.append("the dataset's prompts are unknown at submit: the KV cache is sized for the longest context")
    else:
        new = spec.inference.max_tokens
        typical = Workload(likely_tokens(max(0, bound.context - new), facts) + new, bound.sequences)
    if engine == "vllm":
        estimate = _vllm(model, facts, target, bound, typical, notes)
    else:
        estimate = _transformers(model, facts, target, typical, spec.inference.max_tokens, notes)
    if isinstance(spec, RagSpec):
        embedder = target.others.get(spec.hyperparameters.embedding_model)
        # sentence-transformers loads in float32 on either device.
        size = embedder.parameters * 4 if embedder else MINILM_PARAMETERS * 4
        if embedder is None and not spec.hyperparameters.embedding_model.endswith("all-MiniLM-L6-v2"):
            notes.append(
                f"embedding model {spec.hyperparameters.embedding_model!r}: its size is not known, so "
                "all-MiniLM-L6-v2's is assumed"
            )
        estimate = replace_estimate(
            estimate, embedding_model=size, notes=tuple(notes), task=f"rag_inference on {engine}"
        )
    elif isinstance(spec, AgentSpec):
        estimate = replace_estimate(estimate, task=f"agent_inference on {engine}")
    return estimate


def _forward_per_token(facts: ModelFacts, value_bytes: int) -> int:
    """Bytes one token's tensors take inside one layer during a forward pass (no gradients kept)."""
    q, kv = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    return (4 * facts.hidden_size + q + 2 * kv + 3 * facts.intermediate_size) * value_bytes


def _vllm(
    model: ModelSpec,
    facts: ModelFacts,
    target: Target,
    workload: Workload | None,
    typical: Workload | None,
    notes: list[str],
) -> Estimate:
    """vLLM on a CPU holds what the loader sizes for the workload's bound; on a GPU it claims its share of
    the GPU, which must hold the weights, the profiling pass and the KV cache the task's sequences need."""
    options = model.vllm.model_dump(exclude_none=True)
    shape = facts.shape()
    dtype = choose_dtype(
        model.vllm.dtype,
        facts.dtype,
        on_gpu=target.device == "gpu",
        native_bf16=target.bf16 and facts.dtype == "bfloat16",
    )
    if dtype == "auto":  # vLLM's own rule: the checkpoint's 16-bit dtype, and float32 checkpoints in 16 bits
        dtype = facts.dtype if value_bytes(facts.dtype) == 2 else "bfloat16"
    context = model.vllm.max_model_len or choose_context(shape, workload) or CONTEXT_FLOOR
    weights = facts.loaded_bytes(dtype)
    fixed_kv = options.get("kv_cache_memory_bytes")
    # The sampler's float32 logits, and their softmax, over max_num_seqs rows.
    sampler = int(options.get("max_num_seqs") or VLLM_MAX_SEQS) * facts.vocab_size * 4 * 3
    if target.device == "cpu":
        kv = int(fixed_kv) if fixed_kv else kv_cache_bytes(shape, dtype, context, workload)
        activations = VLLM_BATCHED_TOKENS["cpu"] * _forward_per_token(facts, value_bytes(dtype)) + sampler
        return Estimate(
            task="inference on vllm",
            device="cpu",
            dtype=dtype,
            weights=weights,
            packed_weights=(VLLM_CPU_WEIGHT_COPIES - 1) * weights,
            kv_cache=kv,
            activations=activations,
            # An engine's first start compiles its kernels; once warm, the activations take that room.
            overhead=max(VLLM_CPU_FIRST_START_BYTES - activations, CPU_RUNTIME_BYTES["inference"]),
            notes=tuple(notes),
        )
    tp = model.vllm.tensor_parallel_size
    max_seqs = int(options.get("max_num_seqs") or VLLM_MAX_SEQS)
    batched = int(options.get("max_num_batched_tokens") or VLLM_BATCHED_TOKENS["gpu"])
    kv_value = 1 if str(options.get("kv_cache_dtype", "")).startswith("fp8") else value_bytes(dtype)
    if fixed_kv:
        kv = int(fixed_kv)
    else:
        # vLLM refuses to start without room for one sequence of the full context.
        kv = facts.kv_bytes(1, context, kv_value)
        if typical is not None:
            kv = max(kv, facts.kv_bytes(min(typical.sequences, max_seqs), min(typical.context, context), kv_value))
    # vLLM's profiling pass: one step of max_num_batched_tokens, and sampling over max_num_seqs rows.
    activations = batched * _forward_per_token(facts, value_bytes(dtype)) // tp + sampler
    overhead = GPU_CONTEXT_BYTES + (0 if model.vllm.enforce_eager else VLLM_GRAPH_BYTES)
    used = weights // tp + math.ceil(kv / min(tp, facts.kv_heads)) + activations + overhead
    utilization = model.vllm.gpu_memory_utilization
    return Estimate(
        task="inference on vllm",
        device="gpu",
        gpus=tp,
        dtype=dtype,
        weights=weights // tp,
        kv_cache=math.ceil(kv / min(tp, facts.kv_heads)),
        activations=activations,
        overhead=overhead,
        reserve=math.ceil(used / utilization) - used,
        notes=tuple(notes),
    )


def _transformers_dtype(model: ModelSpec, facts: ModelFacts, target: Target) -> str:
    """The dtype the loader hands :class:`~mloc.llm.hf_engine.TransformersEngine`."""
    if model.vllm.dtype and model.vllm.dtype != "auto":
        return DTYPE_NAMES.get(model.vllm.dtype, model.vllm.dtype)
    if target.device == "gpu":
        return facts.dtype  # transformers' 'auto' keeps the checkpoint's dtype
    return "bfloat16" if facts.dtype == "bfloat16" and target.bf16 else "float32"


def _transformers(
    model: ModelSpec, facts: ModelFacts, target: Target, workload: Workload | None, new: int, notes: list[str]
) -> Estimate:
    dtype = _transformers_dtype(model, facts, target)
    if workload is None:
        workload = Workload(min(facts.max_context, UNKNOWN_PROMPT_TOKENS + new), DEFAULT_BATCH["transformers"])
    prompt = max(1, workload.context - new)
    value = value_bytes(dtype)
    # Prefill runs one layer at a time over the whole batch; generate keeps the last position's logits
    # in float32 with a few copies (processors, softmax, sampling).
    activations = workload.sequences * (prompt * _forward_per_token(facts, value) + facts.vocab_size * 4 * 3)
    return _on_transformers("inference on transformers", dtype, facts, target, workload, activations, notes)


def _on_transformers(
    task: str, dtype: str, facts: ModelFacts, target: Target, workload: Workload, activations: int, notes: list[str]
) -> Estimate:
    """A model held by the transformers engine, its KV cache for ``workload``, and ``activations``."""
    return Estimate(
        task=task,
        device=target.device,
        dtype=dtype,
        weights=facts.loaded_bytes(dtype),
        kv_cache=facts.kv_bytes(workload.sequences, workload.context, value_bytes(dtype)),
        activations=activations,
        overhead=GPU_CONTEXT_BYTES if target.device == "gpu" else CPU_RUNTIME_BYTES["inference"],
        notes=tuple(notes),
    )


def eval_estimate(spec: EvalSpec, facts: ModelFacts, target: Target) -> Estimate:
    """lm-eval's HFLM over the transformers engine, ``eval.batch_size`` requests at a time: the larger of
    its two phases. Scoring (log-likelihoods: harness tasks, multiple choice) runs one forward pass over
    whole prompts and keeps the logits of every position and their log-softmax; generating (harness tasks,
    exact match, generation) is the transformers engine's generate."""
    # The executor forces the transformers engine whatever model.engine says, as the loader loads it.
    model = (spec.model or ModelSpec.model_validate({"source": {"identifier": "worker-default"}})).model_copy(
        update={"engine": Engine.TRANSFORMERS}
    )
    options = spec.eval
    batch = options.batch_size
    shots = options.num_fewshot or 0
    # The data is on the worker: each prompt is taken as UNKNOWN_PROMPT_TOKENS a question, and as many
    # again for each solved example before it. HFLM truncates to the model's context from its config.
    prompt = min(facts.max_context, UNKNOWN_PROMPT_TOKENS * (1 + shots))
    notes = [
        f"the eval data is on the worker: each prompt is taken as {prompt} tokens ({UNKNOWN_PROMPT_TOKENS} for "
        f"the question and for each of {shots} few-shot examples)"
    ]
    if options.tasks and options.num_fewshot is None:
        notes.append("harness tasks' own few-shot counts are unknown at submit: 0 is assumed")
    choices = any(task.type == CustomType.MULTIPLE_CHOICE for task in options.custom)
    completions = any(task.type != CustomType.MULTIPLE_CHOICE for task in options.custom)
    phases: list[Estimate] = []
    if options.tasks or completions:
        new = options.max_tokens or (EVAL_HARNESS_NEW_TOKENS if options.tasks else EVAL_CUSTOM_NEW_TOKENS)
        workload = Workload(min(facts.max_context, prompt + new), batch)
        phases.append(_transformers(model, facts, target, workload, new, notes))
    if options.tasks or choices:
        phases.append(_scoring(model, facts, target, Workload(prompt, batch), notes))
    return replace_estimate(max(phases, key=lambda phase: phase.total), task="eval on transformers")


def _scoring(model: ModelSpec, facts: ModelFacts, target: Target, workload: Workload, notes: list[str]) -> Estimate:
    """One forward pass over a batch of whole prompts: HFLM keeps the logits of every position, in the
    model's dtype, and their log-softmax beside them; the model's config keeps a KV cache as it goes."""
    dtype = _transformers_dtype(model, facts, target)
    value = value_bytes(dtype)
    activations = (
        workload.sequences * workload.context * (_forward_per_token(facts, value) + 2 * facts.vocab_size * value)
    )
    return _on_transformers("eval on transformers", dtype, facts, target, workload, activations, notes)
