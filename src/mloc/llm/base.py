"""The engine interface. Implementations live beside it (``vllm_engine``, ``hf_engine``)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

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


# A prompt's sampling: one for every prompt of a call, or one each (a dataset's rows carry their own).
Samplings: TypeAlias = Sampling | Sequence[Sampling]


def per_prompt(prompts: Sequence[str], sampling: Samplings) -> list[Sampling]:
    """One Sampling per prompt: a shared one repeated, or the sequence given, which must match the prompts."""
    if isinstance(sampling, Sampling):
        return [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(
            f"generate got {len(sampling)} samplings for {len(prompts)} prompts; give one Sampling for all of "
            "them or one per prompt"
        )
    return list(sampling)


def _sampling_groups(samplings: Sequence[Sampling]) -> list[tuple[Sampling, list[int]]]:
    """The positions of the prompts that share each distinct sampling, in order of first use."""
    groups: dict[str, tuple[Sampling, list[int]]] = {}
    # Rows of one dataset mostly share a few Sampling objects: each is serialised once, not once per prompt.
    keys: dict[int, str] = {}
    for position, sampling in enumerate(samplings):
        key = keys.get(id(sampling))
        if key is None:
            key = keys[id(sampling)] = sampling.model_dump_json()
        groups.setdefault(key, (sampling, []))[1].append(position)
    return list(groups.values())


def generate_by_group(
    prompts: Sequence[str],
    sampling: Samplings,
    generate_one: Callable[[Sequence[str], Sampling], list[list[Generation]]],
    cancel: threading.Event | None = None,
) -> list[list[Generation]]:
    """``generate`` for an engine whose calls take one sampling: a call per distinct sampling, the outputs
    put back in prompt order. A cancel ends the call after the group it stops, with the prompts done."""
    if isinstance(sampling, Sampling):
        return generate_one(prompts, sampling)
    samplings = per_prompt(prompts, sampling)
    done: dict[int, list[Generation]] = {}
    for shared, positions in _sampling_groups(samplings):
        if cancel is not None and cancel.is_set():
            break
        generations = generate_one([prompts[position] for position in positions], shared)
        for position, samples in zip(positions, generations, strict=True):
            done[position] = [replace(sample, index=position) for sample in samples]
    return [done[position] for position in sorted(done)]


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
        sampling: Samplings,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        """Generate ``n`` completions for each prompt, in prompt order.

        ``sampling`` is one Sampling for every prompt, or a sequence of one per prompt: an engine runs
        prompts with different sampling in one batch where it can, so rows with their own max_tokens do
        not each cost a batch. ``adapter`` is a LoRA folder applied to this call only. When ``cancel`` is
        set mid-call, an engine that can stop early returns what it has so far (the caller then checks the
        event); others finish.
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
