"""MLOC's LLM engine layer: one interface over vLLM and transformers, shared by every executor that
generates text (inference, rag_inference, agent_inference)."""

from mloc.llm.base import Generation, LLMEngine

__all__ = ["Generation", "LLMEngine"]
