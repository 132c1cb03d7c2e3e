"""Vector stores behind one small interface: Chroma (persistent collections) and FAISS.

A named collection lives under the worker's vectors folder and is reused by later tasks: chunks
already in it (same id, i.e. same source, position and text) are not embedded again. An unnamed
collection lives in memory for one task. A collection remembers the embedding model it was built
with, and refuses queries from another one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import write_json_atomic
from mloc.executors.rag.documents import Chunk

if TYPE_CHECKING:
    import numpy as np

VECTOR_DBS = ("chromadb", "faiss")
MODEL_KEY = "mloc_embedding_model"
DIM_KEY = "mloc_dimension"


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk; ``score`` is the cosine similarity to the query (1 is identical)."""

    text: str
    source: str
    chunk: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "chunk": self.chunk,
            "score": round(self.score, 4),
            "text": self.text,
            "metadata": self.metadata,
        }


class VectorStore(ABC):
    kind: str
    name: str
    persistent: bool

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def embedding_model(self) -> str | None:
        """The embedding model the collection was built with; None for a new, empty one."""

    @abstractmethod
    def missing(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the collection lacks."""

    @abstractmethod
    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None: ...

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop a temporary collection."""


@contextlib.contextmanager
def collection_lock(vectors_dir: Path, kind: str, name: str) -> Iterator[None]:
    """Serialise tasks (in any process on this machine) that index or read one named collection."""
    folder = vectors_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{kind}-{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_store(kind: str, name: str | None, vectors_dir: Path, *, embedding_model: str, dimension: int) -> VectorStore:
    """Open (or create) a collection; ``name=None`` gives a temporary in-memory one."""
    store: VectorStore
    if kind == "chromadb":
        from mloc.executors.rag.chroma import ChromaStore

        store = ChromaStore(name, vectors_dir / "chroma", embedding_model=embedding_model, dimension=dimension)
    elif kind == "faiss":
        store = FaissStore(name, vectors_dir / "faiss", embedding_model=embedding_model, dimension=dimension)
    else:
        raise ExecutionError(f"unknown vector_db {kind!r}; use one of: {', '.join(VECTOR_DBS)}")
    built_with = store.embedding_model()
    if built_with is not None and built_with != embedding_model:
        raise ExecutionError(
            f"collection {name!r} ({kind}) was indexed with embedding_model {built_with!r}, not "
            f"{embedding_model!r}; use that model or another collection name"
        )
    return store


def existing_embedding_model(kind: str, name: str, vectors_dir: Path) -> str | None:
    """The embedding model of a persisted collection, or None where no such collection exists."""
    if kind == "faiss":
        meta = vectors_dir / "faiss" / name / "meta.json"
        return str(json.loads(meta.read_text())["embedding_model"]) if meta.exists() else None
    from mloc.executors.rag.chroma import stored_embedding_model

    return stored_embedding_model(name, vectors_dir / "chroma")


class FaissStore(VectorStore):
    """A flat inner-product index over normalised vectors, with its chunks in a JSON-lines file."""

    kind = "faiss"

    def __init__(self, name: str | None, root: Path, *, embedding_model: str, dimension: int) -> None:
        import faiss

        self.name = name or f"tmp-{uuid.uuid4().hex[:12]}"
        self.persistent = name is not None
        self.folder = root / self.name
        self._model = embedding_model
        self._built_with: str | None = None
        self.rows: list[dict[str, Any]] = []
        self.index: Any = faiss.IndexFlatIP(dimension)
        meta_path = self.folder / "meta.json"
        if self.persistent and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            self._built_with = str(meta["embedding_model"])
            if int(meta["dimension"]) != dimension and self._built_with == embedding_model:
                raise ExecutionError(f"FAISS collection {self.name!r} is damaged: its dimension does not match")
            self.index = faiss.read_index(str(self.folder / "index.faiss"))
            with open(self.folder / "chunks.jsonl", encoding="utf-8") as handle:
                self.rows = [json.loads(line) for line in handle if line.strip()]
            if len(self.rows) != self.index.ntotal:
                raise ExecutionError(
                    f"FAISS collection {self.name!r} is damaged ({len(self.rows)} chunks, "
                    f"{self.index.ntotal} vectors); delete {self.folder} and index again"
                )
        self._ids = {row["id"] for row in self.rows}

    def count(self) -> int:
        return int(self.index.ntotal)

    def embedding_model(self) -> str | None:
        return self._built_with

    def missing(self, ids: Sequence[str]) -> set[str]:
        return {item for item in ids if item not in self._ids}

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        if not chunks:
            return
        self.index.add(vectors)
        for chunk in chunks:
            self.rows.append(
                {
                    "id": chunk.id,
                    "text": chunk.text,
                    "source": chunk.source,
                    "chunk": chunk.index,
                    "metadata": chunk.metadata,
                }
            )
            self._ids.add(chunk.id)
        if self.persistent:
            self._save()

    def _save(self) -> None:
        import faiss

        self.folder.mkdir(parents=True, exist_ok=True)
        for name, writer in (
            ("index.faiss", lambda path: faiss.write_index(self.index, str(path))),
            (
                "chunks.jsonl",
                lambda path: path.write_text("".join(json.dumps(row) + "\n" for row in self.rows)),
            ),
        ):
            temporary = self.folder / f".{name}.tmp"
            writer(temporary)
            os.replace(temporary, self.folder / name)
        # meta.json last: a collection without it is treated as new, never as half-written.
        write_json_atomic(self.folder / "meta.json", {"embedding_model": self._model, "dimension": self.index.d})
        self._built_with = self._model

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        if self.index.ntotal == 0:
            return [[] for _ in range(len(vectors))]
        scores, positions = self.index.search(vectors, min(k, self.index.ntotal))
        results = []
        for row_scores, row_positions in zip(scores, positions, strict=True):
            hits = []
            for score, position in zip(row_scores, row_positions, strict=True):
                if position < 0:
                    continue
                row = self.rows[int(position)]
                hits.append(Hit(row["text"], row["source"], int(row["chunk"]), float(score), row["metadata"]))
            results.append(hits)
        return results
