"""The engine interface. Implementations live beside it (``vllm_engine``, ``hf_engine``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from mloc.spec.sampling import Message, Sampling


@dataclass(frozen=True)
class Generation:
    """One completion of one prompt, with token counts from the engine's own tokenizer."""

    index: int
    output: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class LLMEngine(ABC):
    """A loaded model that generates text in batches."""

    name: str  # "vllm" or "transformers"
    model_id: str  # what the task named (hub id, path or packaged model name)

    @abstractmethod
    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[list[Generation]]:
        """Generate ``sampling.n`` completions for each prompt, in prompt order."""

    @abstractmethod
    def render_chat(self, messages: Sequence[Message]) -> str:
        """A prompt for a conversation: the tokenizer's chat template, or plain turns when it has none."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by this model's tokenizer."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""
