"""``rag_inference``: answer questions from documents retrieved from a vector store."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict, check_name
from mloc.spec.sampling import Sampling


class DocumentSource(Strict):
    """One of inline ``text``, a file ``path`` or a ``glob`` of files."""

    text: str | None = None
    path: str | None = None
    glob: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> DocumentSource:
        given = [name for name in ("text", "path", "glob") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a document needs exactly one of 'text', 'path' or 'glob'; got {given or 'none'}")
        return self


class RagOptions(Strict):
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    vector_db: Literal["chromadb", "faiss"] = "chromadb"
    retrieval_k: int = Field(5, ge=1, le=1000)
    chunk_size: int = Field(500, ge=16, le=100_000)
    chunk_overlap: int = Field(50, ge=0)
    collection: str | None = Field(None, description="Named collection that later tasks can reuse.")

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "collection")

    @model_validator(mode="after")
    def _overlap(self) -> RagOptions:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        return self


class RagSpec(SpecBase):
    kind: ClassVar[str] = "RAGTask"
    task_type: Literal["rag_inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = Field(None, description="The LLM that writes answers; the worker default if unset.")
    hyperparameters: RagOptions = Field(default_factory=RagOptions)
    documents: list[DocumentSource] = Field(default_factory=list)
    questions: list[str] = Field(..., min_length=1)
    inference: Sampling = Field(default_factory=Sampling)
