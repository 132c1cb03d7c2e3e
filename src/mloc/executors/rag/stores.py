"""Collections of chunks in LangChain vector stores: Chroma (``langchain_chroma``) and FAISS.

A named collection lives under the worker's vectors folder and is kept by later tasks, which bring
it in step with their documents (see ``sync.py``). An unnamed collection lives in memory for one
task. A collection remembers the embedding model it was built with and refuses another one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError

if TYPE_CHECKING:
    from langchain_core.documents import Document
    from langchain_core.vectorstores import VectorStore

    from mloc.executors.rag.embeddings import Embedder

VECTOR_DBS = ("chromadb", "faiss")
MODEL_KEY = "mloc_embedding_model"
DIM_KEY = "mloc_dimension"
EXCERPT_CHARS = 160


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk; ``score`` is the cosine similarity to the query (1 is identical)."""

    text: str
    source: str
    chunk: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    start: int | None = None

    @classmethod
    def from_document(cls, document: Document, score: float) -> Hit:
        from mloc.executors.rag.chunks import CHUNK_KEY, SOURCE_KEY, START_KEY

        meta = document.metadata
        extra = {
            key: value
            for key, value in meta.items()
            if key not in (SOURCE_KEY, CHUNK_KEY, START_KEY) and not key.startswith("mloc_")
        }
        start = meta.get(START_KEY)
        return cls(
            document.page_content,
            str(meta[SOURCE_KEY]),
            int(meta[CHUNK_KEY]),
            score,
            extra,
            None if start is None else int(start),
        )

    def excerpt(self) -> str:
        text = " ".join(self.text.split())
        return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1].rstrip() + "…"

    def to_dict(self, rank: int | None = None) -> dict[str, Any]:
        """The shape of one source in a result: stable, so clients can print it."""
        found: dict[str, Any] = {} if rank is None else {"rank": rank}
        return found | {
            "source": self.source,
            "chunk": self.chunk,
            "start": self.start,
            "score": round(self.score, 4),
            "excerpt": self.excerpt(),
            "text": self.text,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class StoredDocument:
    """What a collection holds of one document: its hash, the chunks it should have, those it has."""

    digest: str
    expected: int
    found: int

    @property
    def complete(self) -> bool:
        return self.found == self.expected


class Collection(ABC):
    """One collection in a LangChain vector store, with what keeping it in step with documents needs.

    Chunks go in through the store's ``add_documents``, which embeds them with the collection's
    embeddings; ``vectorstore`` is the LangChain object itself, for anything else LangChain offers.
    """

    kind: str
    name: str
    persistent: bool
    vectorstore: VectorStore

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def embedding_model(self) -> str | None:
        """The embedding model the collection was built with; None for a new, empty one."""

    @abstractmethod
    def manifest(self) -> dict[str, StoredDocument]:
        """Every document the collection holds chunks of, by source."""

    @abstractmethod
    def delete_sources(self, sources: Sequence[str]) -> int:
        """Drop every chunk of these documents; returns how many chunks went."""

    @abstractmethod
    def add(self, chunks: Sequence[Document]) -> None:
        """Embed and store chunks (each with its ``id``)."""

    @abstractmethod
    def search(self, vectors: Sequence[Sequence[float]], k: int) -> list[list[Hit]]: ...

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Write what is held in memory; stores that write as they go have nothing to do."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop a temporary collection."""


def manifest_of(metadatas: Sequence[dict[str, Any] | None]) -> dict[str, StoredDocument]:
    """Documents by source from their chunks' metadata; chunks of one document agree on its hash,
    and any disagreement (or a chunk from before hashes were kept) marks the document as changed."""
    from mloc.executors.rag.chunks import COUNT_KEY, HASH_KEY, SOURCE_KEY

    found: dict[str, StoredDocument] = {}
    for meta in metadatas:
        if not meta or SOURCE_KEY not in meta:
            continue
        source = str(meta[SOURCE_KEY])
        digest = str(meta.get(HASH_KEY, ""))
        expected = int(meta.get(COUNT_KEY, -1))
        seen = found.get(source)
        if seen is None:
            found[source] = StoredDocument(digest, expected, 1)
        elif seen.digest != digest or seen.expected != expected:
            found[source] = StoredDocument("", -1, seen.found + 1)
        else:
            found[source] = StoredDocument(digest, expected, seen.found + 1)
    return found


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


def open_store(
    kind: str, name: str | None, vectors_dir: Path, *, embedder: Embedder, reset: bool = False
) -> Collection:
    """Open (or create) a collection; ``name=None`` gives a temporary in-memory one, ``reset`` an
    empty one in place of what the name held (whatever embedding model built it)."""
    collection: Collection
    if kind == "chromadb":
        from mloc.executors.rag.chroma import ChromaCollection

        collection = ChromaCollection(name, vectors_dir / "chroma", embedder=embedder, reset=reset)
    elif kind == "faiss":
        from mloc.executors.rag.faiss_store import FaissCollection

        collection = FaissCollection(name, vectors_dir / "faiss", embedder=embedder, reset=reset)
    else:
        raise ExecutionError(f"unknown vector_db {kind!r}; use one of: {', '.join(VECTOR_DBS)}")
    built_with = collection.embedding_model()
    if built_with is not None and built_with != embedder.name:
        raise ExecutionError(
            f"collection {name!r} ({kind}) was indexed with embedding_model {built_with!r}, not "
            f"{embedder.name!r}; use that model, another collection name, or collection_reset: true "
            "to index it again with this one"
        )
    return collection


def existing_embedding_model(kind: str, name: str, vectors_dir: Path) -> str | None:
    """The embedding model of a persisted collection, or None where no such collection exists."""
    if kind == "faiss":
        meta = vectors_dir / "faiss" / name / "meta.json"
        return str(json.loads(meta.read_text())["embedding_model"]) if meta.exists() else None
    from mloc.executors.rag.chroma import stored_embedding_model

    return stored_embedding_model(name, vectors_dir / "chroma")
