"""Warm LLM engines for the executors that generate text beside other work (RAG, agents)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mloc.executors.base import RunContext
from mloc.spec.base import ModelSpec

if TYPE_CHECKING:
    from mloc.llm.base import LLMEngine
    from mloc.llm.cache import EngineCache


class EngineHolder:
    """Keeps the engines a long-lived executor process has loaded, for the next task to reuse."""

    def __init__(self, cache_bytes: int | None = None) -> None:
        self._cache_bytes = cache_bytes
        self._cache: EngineCache | None = None

    @property
    def cache(self) -> EngineCache:
        if self._cache is None:
            from mloc.llm.cache import EngineCache

            self._cache = EngineCache(self._cache_bytes)
        return self._cache

    def engine(self, model: ModelSpec | None, ctx: RunContext) -> LLMEngine:
        from mloc.llm.loader import load_engine

        loads = self.cache.loads
        started = time.perf_counter()
        engine = load_engine(model, models_dir=ctx.models_dir, cache=self.cache)
        if self.cache.loads > loads:
            ctx.log(f"loaded {engine.model_id} on {engine.name} in {time.perf_counter() - started:.1f}s")
        else:
            ctx.log(f"reusing warm {engine.name} engine for {engine.model_id}")
        return engine

    def warm_models(self) -> list[str]:
        if self._cache is None:
            return []
        return self._cache.warm_models()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.clear()
