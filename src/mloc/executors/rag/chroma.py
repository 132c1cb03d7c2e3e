"""Chroma collections for RAG; imported only by tasks that use ``vector_db: chromadb``.

MLOC computes embeddings itself and hands Chroma the vectors. The collection still records MLOC's
embedding function (registered with Chroma), because a collection made without one gets Chroma's
default, which downloads an ONNX model on first use, and a registered function lets any Chroma
client reopen the collection without naming it again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.errors import NotFoundError
from chromadb.utils.embedding_functions import register_embedding_function

from mloc.executors.rag.documents import Chunk
from mloc.executors.rag.embeddings import Embedder
from mloc.executors.rag.stores import DIM_KEY, MODEL_KEY, Hit, VectorStore

_clients: dict[str, Any] = {}
_embedders: dict[str, Embedder] = {}
_lock = threading.Lock()


@register_embedding_function
class MlocEmbeddingFunction(EmbeddingFunction[Documents]):
    """Sentence-transformers embeddings, normalised, as MLOC's RAG executor computes them."""

    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, input: Documents) -> Embeddings:
        with _lock:
            embedder = _embedders.get(self.model)
            if embedder is None:
                embedder = _embedders[self.model] = Embedder(self.model)
        return list(embedder.embed(list(input)))

    @staticmethod
    def name() -> str:
        return "mloc-sentence-transformers"

    def get_config(self) -> dict[str, Any]:
        return {"model": self.model}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MlocEmbeddingFunction:
        return MlocEmbeddingFunction(str(config["model"]))

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"


def _client(root: Path | None) -> Any:
    key = str(root) if root else ":memory:"
    with _lock:
        client = _clients.get(key)
        if client is None:
            settings = chromadb.Settings(anonymized_telemetry=False, allow_reset=False)
            if root is None:
                client = chromadb.EphemeralClient(settings=settings)
            else:
                root.mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(root), settings=settings)
            _clients[key] = client
    return client


def stored_embedding_model(name: str, root: Path) -> str | None:
    if not (root / "chroma.sqlite3").exists():
        return None
    try:
        collection = _client(root).get_collection(name)
    except (NotFoundError, ValueError):
        return None
    return (collection.metadata or {}).get(MODEL_KEY)


class ChromaStore(VectorStore):
    kind = "chromadb"

    def __init__(self, name: str | None, root: Path, *, embedding_model: str, dimension: int) -> None:
        self.persistent = name is not None
        self.name = name or f"tmp-{uuid.uuid4().hex[:12]}"
        self.client = _client(root if self.persistent else None)
        self._built_with = stored_embedding_model(self.name, root) if self.persistent else None
        function = MlocEmbeddingFunction(self._built_with or embedding_model)
        self.collection = self.client.get_or_create_collection(
            self.name,
            embedding_function=function,
            configuration={"hnsw": {"space": "cosine"}},
            metadata={MODEL_KEY: embedding_model, DIM_KEY: dimension},
        )
        self._max_batch = int(self.client.get_max_batch_size())

    def count(self) -> int:
        return int(self.collection.count())

    def embedding_model(self) -> str | None:
        return self._built_with

    def missing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), self._max_batch):
            found.update(self.collection.get(ids=list(ids[start : start + self._max_batch]), include=[])["ids"])
        return set(ids) - found

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        for start in range(0, len(chunks), self._max_batch):
            batch = chunks[start : start + self._max_batch]
            self.collection.add(
                ids=[chunk.id for chunk in batch],
                documents=[chunk.text for chunk in batch],
                embeddings=vectors[start : start + len(batch)],
                metadatas=[{**chunk.metadata, "source": chunk.source, "chunk": chunk.index} for chunk in batch],
            )
        self._built_with = self._built_with or self.collection.metadata.get(MODEL_KEY)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        total = self.count()
        if total == 0:
            return [[] for _ in range(len(vectors))]
        found = self.collection.query(
            query_embeddings=vectors,
            n_results=min(k, total),
            include=["documents", "metadatas", "distances"],
        )
        results = []
        for texts, metas, distances in zip(found["documents"], found["metadatas"], found["distances"], strict=True):
            hits = []
            for text, meta, distance in zip(texts, metas, distances, strict=True):
                extra = {key: value for key, value in meta.items() if key not in ("source", "chunk")}
                hits.append(Hit(text, str(meta["source"]), int(meta["chunk"]), 1.0 - float(distance), extra))
            results.append(hits)
        return results

    def close(self) -> None:
        if not self.persistent:
            self.client.delete_collection(self.name)
