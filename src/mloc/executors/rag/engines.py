"""Warm LLM engines for the executors that generate text beside other work (RAG, agents)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mloc.executors.base import RunContext
from mloc.executors.engines import warm_or_load
from mloc.spec.base import ModelSpec
from mloc.spec.rag import RagSpec

if TYPE_CHECKING:
    from mloc.executors.rag.stores import Hit
    from mloc.llm.base import LLMEngine
    from mloc.llm.cache import EngineCache
    from mloc.llm.loader import Workload


def answer_workload(
    spec: RagSpec, hits: Sequence[Sequence[Hit]], batch: int, *, questions: Sequence[str] | None = None
) -> Workload:
    """What answering asks of an engine: each question's prompt with every chunk retrieved for it (an
    upper bound, as the prompt may keep fewer), ``batch`` questions per engine call."""
    from mloc.llm.loader import CHAT_TURN_TOKENS, Workload

    options = spec.hyperparameters
    frame = options.prompt_template if options.prompt_template is not None else options.system_prompt
    prompts = [
        frame + question + "".join(f"[{number}] ({hit.source})\n{hit.text}\n\n" for number, hit in enumerate(found))
        for question, found in zip(spec.questions if questions is None else questions, hits, strict=True)
    ]
    turns = 0 if options.prompt_template is not None else 2  # the system prompt and the question
    sequences = min(len(prompts), batch) * spec.inference.n
    return Workload.of(prompts, spec.inference.max_tokens, sequences, overhead=16 + CHAT_TURN_TOKENS * turns)


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

    def engine(self, model: ModelSpec | None, ctx: RunContext, workload: Workload | None = None) -> LLMEngine:
        """A warm engine that serves ``workload`` (any engine of the model, when None), else a new one."""
        return warm_or_load(self.cache, model, ctx, workload=workload)

    def warm_models(self) -> list[str]:
        if self._cache is None:
            return []
        return self._cache.warm_models()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.clear()
