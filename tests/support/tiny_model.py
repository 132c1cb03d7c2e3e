"""Tiny real causal language models for tests; the builder lives in the package (mloc.llm.tiny), where
workers use it for the packaged model ``mloc-tiny-llama``."""

from __future__ import annotations

from mloc.llm.tiny import CHAT_TEMPLATE, CORPUS, build_tiny_causal_lm

__all__ = ["CHAT_TEMPLATE", "CORPUS", "build_tiny_causal_lm"]
