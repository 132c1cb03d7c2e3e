"""Tokenizer-level helpers both engines share, so they count, render and cut text the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mloc.spec.sampling import Message

# A conversation rendered without a chat template ends with this cue; the reply stops at the next turn.
PLAIN_ASSISTANT_CUE = "Assistant:"
# A base model continues the conversation it was shown: a turn of any role it writes is not its reply.
PLAIN_TURN_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids for a prompt; a prompt that already starts with BOS (a chat template's) gets no second."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    ids: list[int] = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    return ids


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The tokenizer's chat template with a generation prompt, or plain "Role: text" turns."""
    turns = [{"role": message.role, "content": message.content} for message in messages]
    if has_template(tokenizer):
        rendered: str = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return rendered
    lines = [f"{message.role.capitalize()}: {message.content}" for message in messages]
    return "\n".join([*lines, PLAIN_ASSISTANT_CUE])


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded, as vLLM and the OpenAI API do), and whether
    one was found."""
    cut = min((pos for pos in (text.find(stop) for stop in stops if stop) if pos >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def eos_ids(tokenizer: Any, generation_config: Any, extra: Sequence[int] = ()) -> list[int]:
    """Every token id that ends a completion: the tokenizer's eos, the generation config's, and extras."""
    ids: list[int] = []
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id, *extra):
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return ids
