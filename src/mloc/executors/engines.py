"""An executor's engine: loaded with the run's hooks, warm from the executor's cache when it holds one
that serves the task (and said so in the task's log), with the LoRA adapter folder it names checked.
:class:`EngineExecutor` is the base of the executors that keep their engines between tasks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mloc.errors import ExecutionError
from mloc.executors.base import Executor, RunContext
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


class EngineHolder:
    """Keeps the engines a long-lived executor process has loaded, for the next task to reuse."""

    def __init__(self, cache_bytes: int | None = None) -> None:
        self._cache_bytes = cache_bytes
        self._cache: EngineCache | None = None

    @property
    def cache(self) -> EngineCache:
        if self._cache is None:
            from mloc.llm.cache import cache_for_executor

            self._cache = cache_for_executor(self._cache_bytes)
        return self._cache

    def engine(
        self,
        model: ModelSpec | None,
        ctx: RunContext,
        *,
        lora_rank: int | None = None,
        workload: Workload | None = None,
    ) -> LLMEngine:
        """A warm engine that serves ``workload`` (any engine of the model, when None), else a new one
        (the worker's VLLM_MODEL when ``model`` is None): see :func:`mloc.llm.loader.load_engine`."""
        from mloc.llm.loader import load_engine

        cache = self.cache
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

    def warm_models(self) -> list[str]:
        return [] if self._cache is None else self._cache.warm_models()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.clear()


class EngineExecutor(Executor):
    """An executor whose loaded engines stay warm for its next task (inference, eval, RAG, agents)."""

    def __init__(self, cache_bytes: int | None = None) -> None:
        self.engines = EngineHolder(cache_bytes)

    @property
    def cache(self) -> EngineCache:
        return self.engines.cache

    def warm_models(self) -> list[str]:
        return self.engines.warm_models()

    def close(self) -> None:
        self.engines.close()
