"""Tiny real models for the engine tests, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.llm.builders import TINY_HIDDEN, make_lora, persistent_models_dir
from tests.support.tiny_model import build_tiny_causal_lm


@pytest.fixture(autouse=True)
def _small_kv_cache(small_vllm_kv_cache: None) -> None:
    """Every engine test here keeps a small KV cache (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", hidden_size=TINY_HIDDEN)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat") / "model"
    return build_tiny_causal_lm(path, hidden_size=TINY_HIDDEN, chat_template=True)


@pytest.fixture(scope="session")
def tiny_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return persistent_models_dir()
