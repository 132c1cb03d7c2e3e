"""The engine interface. Implementations live beside it (``vllm_engine``, ``hf_engine``)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloc.llm import text
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
    # Longest sequence (prompt + completion) the model takes; None when the engine cannot tell.
    max_context: int | None = None
    # Bytes the loaded model is estimated to hold; the engine cache budgets with it.
    memory_bytes: int = 0
    # What the weights were loaded as ("bfloat16", "float32", ...), as the engine reports it.
    dtype: str = ""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        """Generate ``sampling.n`` completions for each prompt, in prompt order.

        ``adapter`` is a LoRA folder applied to this call only. When ``cancel`` is set mid-call, an engine
        that can stop early returns what it has so far (the caller then checks the event); others finish.
        """

    @abstractmethod
    def render_chat(self, messages: Sequence[Message]) -> str:
        """A prompt for a conversation: the tokenizer's chat template, or plain turns when it has none."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by this model's tokenizer."""

    @property
    def has_chat_template(self) -> bool:
        """Whether ``render_chat`` uses the model's own template rather than plain turns."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""


class TokenizerEngine(LLMEngine):
    """An engine with a Hugging Face tokenizer, which renders chats and counts tokens the same way
    whatever generates."""

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        return text.has_template(self.tokenizer)

    def render_chat(self, messages: Sequence[Message]) -> str:
        return text.render_chat(self.tokenizer, messages)

    def count_tokens(self, value: str) -> int:
        return len(text.encode(self.tokenizer, value))
