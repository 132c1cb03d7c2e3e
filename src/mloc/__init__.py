"""MLOC: a control plane for LLM inference, fine-tuning, RLHF, RAG and agent workloads."""

__version__ = "0.1.0"
