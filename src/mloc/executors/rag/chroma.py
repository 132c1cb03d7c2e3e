"""Chroma collections through ``langchain_chroma.Chroma``; imported only by tasks that use ``vector_db: chromadb``.

LangChain embeds the chunks with MLOC's embeddings and hands Chroma the vectors. The collection
still records MLOC's embedding function (registered with Chroma) in its configuration: a collection
made without one gets Chroma's default, which downloads an ONNX model on first use, and a registered
function lets any Chroma client reopen the collection without naming it again. MLOC creates the
collection itself, with that function, cosine distance and the embedding model in its metadata, and
then opens it with LangChain.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import chromadb
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Where
from chromadb.errors import NotFoundError
from chromadb.utils.embedding_functions import register_embedding_function
from langchain_chroma import Chroma
from langchain_core.documents import Document

from mloc.executors.rag.chunks import SOURCE_KEY
from mloc.executors.rag.embeddings import Embedder
from mloc.executors.rag.stores import DIM_KEY, MODEL_KEY, Collection, Hit, StoredDocument, manifest_of

_clients: dict[str, Any] = {}
_embedders: dict[str, Embedder] = {}
_lock = threading.Lock()
# Chunks read per call when listing a collection's documents.
PAGE = 5000


@register_embedding_function
class MlocEmbeddingFunction(EmbeddingFunction[Documents]):
    """Sentence-transformers embeddings, normalised, as MLOC's RAG executor computes them."""

    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, input: Documents) -> Embeddings:
        import numpy as np

        with _lock:
            embedder = _embedders.get(self.model)
            if embedder is None:
                embedder = _embedders[self.model] = Embedder(self.model)
        return [np.asarray(vector, dtype="float32") for vector in embedder.embed_documents(list(input))]

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


class ChromaCollection(Collection):
    kind = "chromadb"

    def __init__(self, name: str | None, root: Path, *, embedder: Embedder, reset: bool = False) -> None:
        self.persistent = name is not None
        self.name = name or f"tmp-{uuid.uuid4().hex[:12]}"
        self.embedder = embedder
        self.client = _client(root if self.persistent else None)
        self._built_with = stored_embedding_model(self.name, root) if self.persistent else None
        if reset and self._built_with is not None:
            self.client.delete_collection(self.name)
            self._built_with = None
        self._open()
        self._max_batch = int(self.client.get_max_batch_size())

    vectorstore: Chroma

    def _open(self) -> None:
        if self._built_with is None:
            # Only a new collection gets metadata: the embedding model it records must stay the one it was built with.
            self.client.get_or_create_collection(
                self.name,
                embedding_function=MlocEmbeddingFunction(self.embedder.name),
                configuration={"hnsw": {"space": "cosine"}},
                metadata={MODEL_KEY: self.embedder.name, DIM_KEY: self.embedder.dimension},
            )
        self.vectorstore = Chroma(
            collection_name=self.name,
            client=self.client,
            embedding_function=self.embedder,
            create_collection_if_not_exists=False,
        )

    def _chroma(self) -> Any:
        return self.client.get_collection(self.name)

    def count(self) -> int:
        return int(self._chroma().count())

    def embedding_model(self) -> str | None:
        return self._built_with

    def manifest(self) -> dict[str, StoredDocument]:
        metadatas: list[Any] = []
        while True:
            page = self.vectorstore.get(include=["metadatas"], limit=PAGE, offset=len(metadatas))["metadatas"]
            metadatas.extend(page)
            if len(page) < PAGE:
                return manifest_of(metadatas)

    def delete_sources(self, sources: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(sources), self._max_batch):
            where = cast(Where, {SOURCE_KEY: {"$in": list(sources[start : start + self._max_batch])}})
            ids = self.vectorstore.get(where=where, include=[])["ids"]
            for first in range(0, len(ids), self._max_batch):
                self.vectorstore.delete(ids[first : first + self._max_batch])
            removed += len(ids)
        return removed

    def add(self, chunks: Sequence[Document]) -> None:
        for start in range(0, len(chunks), self._max_batch):
            batch = list(chunks[start : start + self._max_batch])
            self.vectorstore.add_documents(batch, ids=[str(chunk.id) for chunk in batch])
        self._built_with = self._built_with or self.embedder.name

    def search(self, vectors: Sequence[Sequence[float]], k: int) -> list[list[Hit]]:
        total = self.count()
        if total == 0:
            return [[] for _ in vectors]
        results = []
        for vector in vectors:
            # langchain_chroma returns the cosine distance here; the collection is cosine, so 1 - distance.
            found = self.vectorstore.similarity_search_by_vector_with_relevance_scores(list(vector), k=min(k, total))
            results.append([Hit.from_document(document, 1.0 - float(distance)) for document, distance in found])
        return results

    def close(self) -> None:
        if not self.persistent:
            self.client.delete_collection(self.name)
