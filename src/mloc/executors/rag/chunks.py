"""Cut documents into chunks with LangChain's ``RecursiveCharacterTextSplitter``, and name them.

Every chunk carries, besides its document's metadata, the bookkeeping a named collection needs to
follow its documents: the document's content hash (text, metadata and chunking settings) and how
many chunks the document has, so a later task can tell an unchanged document from a changed one and
a complete one from one cut short by a cancelled task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter

SOURCE_KEY = "source"
CHUNK_KEY = "chunk"
START_KEY = "start_index"
HASH_KEY = "mloc_doc_hash"
COUNT_KEY = "mloc_doc_chunks"
# Part of every document hash: a change to how MLOC splits re-chunks the documents it indexed before.
SPLITTER_VERSION = "recursive-1"
# Paragraphs, lines, sentences, words, then characters: the largest natural boundary that fits.
SEPARATORS = ["\n\n", "\n", ". ", " ", ""]


def splitter(size: int, overlap: int) -> RecursiveCharacterTextSplitter:
    # keep_separator="end" keeps ". " and newlines with the text before them, so chunks read as the original.
    return RecursiveCharacterTextSplitter(
        chunk_size=size,
        chunk_overlap=overlap,
        separators=SEPARATORS,
        keep_separator="end",
        add_start_index=True,
    )


def document_hash(document: Document, size: int, overlap: int) -> str:
    """What decides a document's chunks: its text, its metadata and the chunking settings."""
    metadata = {key: value for key, value in document.metadata.items() if key != SOURCE_KEY}
    payload = json.dumps([SPLITTER_VERSION, size, overlap, metadata, document.page_content], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def split_document(document: Document, size: int, overlap: int) -> list[Document]:
    """The chunks of one document, each with its id, position and the document's hash."""
    digest = document_hash(document, size, overlap)
    pieces = splitter(size, overlap).split_documents([document])
    source = str(document.metadata[SOURCE_KEY])
    chunks = []
    for index, piece in enumerate(pieces):
        chunk_id = hashlib.sha256(f"{source}\0{digest}\0{index}".encode()).hexdigest()[:32]
        metadata = {**piece.metadata, CHUNK_KEY: index, HASH_KEY: digest, COUNT_KEY: len(pieces)}
        chunks.append(Document(id=chunk_id, page_content=piece.page_content, metadata=metadata))
    return chunks


def split_documents(documents: Sequence[Document], size: int, overlap: int) -> list[Document]:
    return [chunk for document in documents for chunk in split_document(document, size, overlap)]
