"""Bring a collection in step with a task's documents.

Each document is known by its source (file path or inline id) and its hash. A document whose hash
matches what the collection holds, with all its chunks, is left alone and costs no embedding; a
changed one loses its old chunks and is split and embedded again; in ``replace`` mode a document the
task no longer lists is removed. A task cancelled half-way leaves a document without all its chunks,
and the next task sees it as changed, so a collection never stays half-indexed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.documents import Document

from mloc.errors import ExecutionError
from mloc.executors.rag.chunks import SOURCE_KEY, document_hash, split_document
from mloc.executors.rag.stores import Collection

# Chunks embedded and stored per call: the unit of progress and of cancellation.
EMBED_BATCH = 256


@dataclass
class SyncReport:
    """What one task did to its collection, by document and by chunk."""

    mode: str
    reset: bool = False
    documents: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("listed", "added", "updated", "removed", "unchanged", "empty"), 0)
    )
    chunks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("added", "removed", "unchanged"), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"sync": self.mode, "reset": self.reset, "documents": self.documents, "chunks": self.chunks}


def _noop(*_: Any) -> None:
    return None


def sync_collection(
    collection: Collection,
    documents: Sequence[Document],
    *,
    chunk_size: int,
    chunk_overlap: int,
    mode: str = "replace",
    reset: bool = False,
    check_cancelled: Callable[[], None] = _noop,
    progress: Callable[[int, int, str], None] = _noop,
    log: Callable[[str], None] = _noop,
) -> SyncReport:
    """Make ``collection`` hold ``documents`` (``replace``) or at least them (``append``)."""
    report = SyncReport(mode=mode, reset=reset)
    listed = _unique(documents, chunk_size, chunk_overlap)
    report.documents["listed"] = len(listed)
    stored = collection.manifest()

    stale: list[str] = []
    todo: list[Document] = []
    for source, (document, digest) in listed.items():
        held = stored.get(source)
        if held is not None and held.digest == digest and held.complete:
            report.documents["unchanged"] += 1
            report.chunks["unchanged"] += held.found
            continue
        chunks = split_document(document, chunk_size, chunk_overlap)
        if held is not None:
            stale.append(source)
        if not chunks:
            report.documents["empty" if held is None else "removed"] += 1
            continue
        report.documents["added" if held is None else "updated"] += 1
        todo.extend(chunks)
    if mode == "replace":
        gone = [source for source in stored if source not in listed]
        stale.extend(gone)
        report.documents["removed"] += len(gone)

    check_cancelled()
    if stale:
        report.chunks["removed"] = collection.delete_sources(stale)
    for start in range(0, len(todo), EMBED_BATCH):
        check_cancelled()
        collection.add(todo[start : start + EMBED_BATCH])
        progress(min(start + EMBED_BATCH, len(todo)), len(todo), "embedding")
    report.chunks["added"] = len(todo)
    collection.flush()
    if report.documents["empty"]:
        log(f"{report.documents['empty']} document(s) hold no text and were not indexed")
    docs, pieces = report.documents, report.chunks
    log(
        f"collection {collection.name!r} ({collection.kind}): documents {docs['added']} added, "
        f"{docs['updated']} updated, {docs['removed']} removed, {docs['unchanged']} unchanged; chunks "
        f"{pieces['added']} embedded, {pieces['removed']} removed, {pieces['unchanged']} kept"
    )
    return report


def _unique(documents: Sequence[Document], size: int, overlap: int) -> dict[str, tuple[Document, str]]:
    """Documents by source; the same document listed twice counts once, two different ones under
    one source are an error (the second would silently replace the first)."""
    found: dict[str, tuple[Document, str]] = {}
    for document in documents:
        source = str(document.metadata[SOURCE_KEY])
        digest = document_hash(document, size, overlap)
        seen = found.get(source)
        if seen is None:
            found[source] = (document, digest)
        elif seen[1] != digest:
            raise ExecutionError(
                f"two documents have the source {source!r} but different text or metadata; give each inline "
                "document its own metadata.source, or list a file once"
            )
    return found
