"""What a RAG task's answering asks of an engine, sized before the engine is loaded (the engine:
:mod:`mloc.executors.engines`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mloc.spec.rag import RagSpec

if TYPE_CHECKING:
    from mloc.executors.rag.stores import Hit
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
