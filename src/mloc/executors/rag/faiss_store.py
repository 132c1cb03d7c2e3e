"""FAISS collections: a LangChain ``VectorStore`` over a flat inner-product index, kept as JSON.

LangChain's own FAISS store lives in ``langchain-community`` and saves its documents with pickle,
which it reloads only with ``allow_dangerous_deserialization=True``. This one keeps the same
interface with the chunks in a JSON-lines file beside ``index.faiss``, so opening a collection runs
no code from disk. Vectors are normalised, so the inner product is the cosine similarity.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from mloc.errors import ExecutionError
from mloc.executors.base import write_json_atomic
from mloc.executors.rag.chunks import CHUNK_KEY, SOURCE_KEY
from mloc.executors.rag.embeddings import Embedder
from mloc.executors.rag.stores import Collection, Hit, StoredDocument, manifest_of


class FaissVectorStore(VectorStore):
    """Chunks and their vectors in memory; ``save`` writes them to a folder and ``load`` reads them back."""

    def __init__(self, embedding: Embeddings, dimension: int) -> None:
        self.embedding = embedding
        self.index: Any = faiss.IndexFlatIP(dimension)
        self.rows: list[dict[str, Any]] = []
        self._positions: dict[str, int] = {}

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        metas = metadatas or [{} for _ in texts]
        ids = [item or uuid.uuid4().hex for item in ids] if ids else [uuid.uuid4().hex for _ in texts]
        if not texts:
            return []
        # An id already stored is replaced, as Chroma's upsert does.
        self.delete([item for item in ids if item in self._positions])
        self.index.add(np.asarray(self.embedding.embed_documents(texts), dtype="float32"))
        for item, text, meta in zip(ids, texts, metas, strict=True):
            self._positions[item] = len(self.rows)
            self.rows.append({"id": item, "text": text, "metadata": dict(meta)})
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if ids is None:
            self.index.reset()
            self.rows, self._positions = [], {}
            return True
        positions = sorted({self._positions[item] for item in ids if item in self._positions})
        if not positions:
            return False
        # A flat index removes rows in place and keeps the others in order: the rows list follows suit.
        self.index.remove_ids(np.asarray(positions, dtype="int64"))
        gone = set(positions)
        self.rows = [row for position, row in enumerate(self.rows) if position not in gone]
        self._positions = {row["id"]: position for position, row in enumerate(self.rows)}
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [self._document(self._positions[item]) for item in ids if item in self._positions]

    def _document(self, position: int) -> Document:
        row = self.rows[position]
        return Document(id=row["id"], page_content=row["text"], metadata=row["metadata"])

    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4
    ) -> list[tuple[Document, float]]:
        if self.index.ntotal == 0:
            return []
        query = np.asarray([embedding], dtype="float32")
        scores, positions = self.index.search(query, min(k, self.index.ntotal))
        return [
            (self._document(int(position)), float(score))
            for score, position in zip(scores[0], positions[0], strict=True)
            if position >= 0
        ]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [document for document, _ in self.similarity_search_with_score_by_vector(embedding, k)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        return self.similarity_search_with_score_by_vector(self.embedding.embed_query(query), k)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [document for document, _ in self.similarity_search_with_score(query, k)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda score: score

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> FaissVectorStore:
        store = cls(embedding, int(kwargs.get("dimension") or len(embedding.embed_query("dimension"))))
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        """Write the index and the chunks, then ``meta.json``: a folder without it is treated as new,
        never as half-written."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, writer in (
            ("index.faiss", lambda path: faiss.write_index(self.index, str(path))),
            ("chunks.jsonl", lambda path: path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))),
        ):
            temporary = folder / f".{name}.tmp"
            writer(temporary)
            os.replace(temporary, folder / name)
        write_json_atomic(folder / "meta.json", meta)

    @classmethod
    def load(cls, folder: Path, embedding: Embeddings, dimension: int) -> FaissVectorStore:
        store = cls(embedding, dimension)
        store.index = faiss.read_index(str(folder / "index.faiss"))
        with open(folder / "chunks.jsonl", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    if "source" in row:  # written before chunks kept their place in the metadata
                        row["metadata"] = {
                            **row["metadata"],
                            SOURCE_KEY: row.pop("source"),
                            CHUNK_KEY: row.pop("chunk"),
                        }
                    store.rows.append(row)
        store._positions = {row["id"]: position for position, row in enumerate(store.rows)}
        if len(store.rows) != store.index.ntotal:
            raise ExecutionError(
                f"FAISS collection in {folder} is damaged ({len(store.rows)} chunks, {store.index.ntotal} "
                "vectors); index it again with collection_reset: true"
            )
        return store


class FaissCollection(Collection):
    kind = "faiss"

    def __init__(self, name: str | None, root: Path, *, embedder: Embedder, reset: bool = False) -> None:
        self.name = name or f"tmp-{uuid.uuid4().hex[:12]}"
        self.persistent = name is not None
        self.folder = root / self.name
        self.embedder = embedder
        self._built_with: str | None = None
        self.vectorstore: FaissVectorStore = FaissVectorStore(embedder, embedder.dimension)
        meta_path = self.folder / "meta.json"
        if self.persistent and meta_path.exists():
            if reset:
                meta_path.unlink()  # first, so a crash before the next save leaves a new collection
                return
            meta = json.loads(meta_path.read_text())
            self._built_with = str(meta["embedding_model"])
            if self._built_with == embedder.name:
                if int(meta["dimension"]) != embedder.dimension:
                    raise ExecutionError(
                        f"FAISS collection {self.name!r} is damaged: its dimension does not match; "
                        "index it again with collection_reset: true"
                    )
                self.vectorstore = FaissVectorStore.load(self.folder, embedder, embedder.dimension)

    def count(self) -> int:
        return int(self.vectorstore.index.ntotal)

    def embedding_model(self) -> str | None:
        return self._built_with

    def manifest(self) -> dict[str, StoredDocument]:
        return manifest_of([row["metadata"] for row in self.vectorstore.rows])

    def delete_sources(self, sources: Sequence[str]) -> int:
        wanted = set(sources)
        ids = [row["id"] for row in self.vectorstore.rows if row["metadata"].get(SOURCE_KEY) in wanted]
        self.vectorstore.delete(ids)
        return len(ids)

    def add(self, chunks: Sequence[Document]) -> None:
        self.vectorstore.add_documents(list(chunks), ids=[str(chunk.id) for chunk in chunks])

    def search(self, vectors: Sequence[Sequence[float]], k: int) -> list[list[Hit]]:
        return [
            [
                Hit.from_document(document, score)
                for document, score in self.vectorstore.similarity_search_with_score_by_vector(vector, k)
            ]
            for vector in vectors
        ]

    def flush(self) -> None:
        """Write the collection once a task has changed it: rewriting it per batch would cost a full
        write of every chunk each time."""
        if self.persistent:
            meta = {"embedding_model": self.embedder.name, "dimension": self.embedder.dimension}
            self.vectorstore.save(self.folder, meta)
            self._built_with = self.embedder.name
