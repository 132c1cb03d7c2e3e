"""Retrieval-augmented generation: ``rag_inference`` tasks and the collections agents search."""

from mloc.executors.rag.executor import RagExecutor, Retriever, vectors_dir

__all__ = ["RagExecutor", "Retriever", "vectors_dir"]
