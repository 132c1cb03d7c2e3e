"""An executor's engine: loaded with the run's hooks, warm from the executor's cache when it holds one
that serves the task (and said so in the task's log), with the LoRA adapter folder it names checked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.spec.base import ModelSpec

if TYPE_CHECKING:
    from mloc.llm.base import LLMEngine
    from mloc.llm.cache import EngineCache
    from mloc.llm.loader import Workload


def adapter_folder(model: ModelSpec | None) -> Path | None:
    """The folder of the LoRA adapter ``model.adapter.path`` names, or None when it names none."""
    adapter = model.adapter if model else None
    if adapter is None or not adapter.path:
        return None
    path = Path(adapter.path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ExecutionError(
            f"model.adapter.path {adapter.path!r} is not a LoRA adapter folder (no adapter_config.json at "
            f"{path.resolve()}); give the folder a PEFT/SFT task saved the adapter to, or that task's id"
        )
    return path


def warm_or_load(
    cache: EngineCache,
    model: ModelSpec | None,
    ctx: RunContext,
    *,
    lora_rank: int | None = None,
    workload: Workload | None = None,
) -> LLMEngine:
    """An engine for ``model`` (the worker's VLLM_MODEL when None): see :func:`mloc.llm.loader.load_engine`."""
    from mloc.llm.loader import load_engine

    loads = cache.loads
    engine = load_engine(
        model,
        models_dir=ctx.models_dir,
        cache=cache,
        lora_rank=lora_rank,
        workload=workload,
        on_progress=ctx.progress,
        check_cancelled=ctx.check_cancelled,
        on_log=ctx.log,
    )
    # A cold load logged its own lines (preparing the model, starting the engine, ready).
    if cache.loads == loads:
        ctx.log(f"reusing warm {engine.name} engine for {engine.model_id}")
    return engine
