"""``rag_inference``: answer questions from documents retrieved from a vector store."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict, check_name, unfold_from
from mloc.spec.dataset import DatasetInput
from mloc.spec.sampling import Sampling

# Metadata keys MLOC stores with every chunk; a document's own metadata may not use them.
RESERVED_METADATA = ("chunk", "start_index")
RESERVED_METADATA_PREFIX = "mloc_"


class DocumentSource(Strict):
    """One of inline ``text``, a file ``path`` or a ``glob`` of files."""

    text: str | None = None
    path: str | None = None
    glob: str | None = None
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Stored with every chunk and returned with each source. For inline text, "
        "metadata.source is the document's id in a named collection (else an id is made from its text).",
    )

    @model_validator(mode="after")
    def _one(self) -> DocumentSource:
        given = [name for name in ("text", "path", "glob") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a document needs exactly one of 'text', 'path' or 'glob'; got {given or 'none'}")
        for key in self.metadata:
            if key in RESERVED_METADATA or key.startswith(RESERVED_METADATA_PREFIX):
                raise ValueError(
                    f"metadata key {key!r} is reserved for MLOC's chunk bookkeeping "
                    f"({', '.join(RESERVED_METADATA)} and names starting with {RESERVED_METADATA_PREFIX!r}); rename it"
                )
        return self


DEFAULT_SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. "
    "If they do not contain the answer, say that you do not know."
)


class RagOptions(Strict):
    embedding_model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="A sentence-transformers model: hub id in the worker's cache, or a local folder.",
    )
    vector_db: Literal["chromadb", "faiss"] = "chromadb"
    retrieval_k: int = Field(5, ge=1, le=1000, description="Chunks retrieved per question.")
    chunk_size: int = Field(500, ge=16, le=100_000, description="Largest chunk, in characters.")
    chunk_overlap: int = Field(50, ge=0, description="Characters a chunk repeats from the one before.")
    collection: str | None = Field(
        None,
        description="Named, persistent collection that later tasks reuse and keep in step with their "
        "documents; unset means a temporary in-memory index for this task only.",
    )
    collection_from: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Written 'collection: {from: <task>}': a rag_inference task (a name in the same submission, "
        "or an id) whose named collection to use, with its vector_db and embedding_model; this task waits for "
        "it and runs on a worker that can read that collection.",
    )
    collection_sync: Literal["replace", "append"] = Field(
        "replace",
        description="How a named collection follows the task's documents. replace: it holds exactly "
        "them (changed ones re-embedded, unlisted ones removed). append: listed documents are added or "
        "updated and the others kept. A task without documents only queries.",
    )
    collection_reset: bool = Field(
        False, description="Empty the named collection first and index the task's documents from scratch."
    )
    min_score: float | None = Field(
        None, ge=-1, le=1, description="Drop retrieved chunks whose cosine similarity is below this."
    )
    max_context_tokens: int | None = Field(
        None, ge=16, description="Drop the lowest-ranked chunks until the context fits this many tokens."
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="Instruction for chat models.")
    prompt_template: str | None = Field(
        None,
        description="A completion prompt with {context} (the passages, separated by blank lines) and "
        "{question}, used instead of the chat template: base models answer better to "
        "'Context: ... Question: ... Answer:'.",
    )

    @model_validator(mode="before")
    @classmethod
    def _collection_reference(cls, data: Any) -> Any:
        return unfold_from(data, "collection", "to use")

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "collection")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            missing = [name for name in ("{context}", "{question}") if name not in value]
            if missing:
                raise ValueError(f"prompt_template must contain {' and '.join(missing)}")
        return value

    @model_validator(mode="after")
    def _overlap(self) -> RagOptions:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        if self.vector_db == "chromadb" and self.collection is not None and len(self.collection) < 3:
            raise ValueError(f"collection {self.collection!r} is too short: Chroma needs at least 3 characters")
        if self.collection is not None and self.collection_from is not None:
            raise ValueError(
                "hyperparameters has both collection and collection.from; name the collection, or the task that "
                "indexed it"
            )
        if self.collection is None and self.collection_from is None:
            # Compared with the defaults, not the fields given: a stored task carries every default, and a
            # worker validates it again.
            fields = type(self).model_fields
            given = [
                name for name in ("collection_sync", "collection_reset") if getattr(self, name) != fields[name].default
            ]
            if given:
                raise ValueError(
                    f"{' and '.join(given)} apply to a named collection; set hyperparameters.collection "
                    "(an unnamed collection lasts one task and starts empty)"
                )
        return self


class RagSpec(SpecBase):
    kind: ClassVar[str] = "RAGTask"
    task_type: Literal["rag_inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = Field(None, description="The LLM that writes answers; the worker default if unset.")
    hyperparameters: RagOptions = Field(default_factory=RagOptions)
    documents: list[DocumentSource] = Field(
        default_factory=list,
        description="What to index; may be empty when a named collection already exists.",
    )
    questions: list[str] = Field(default_factory=list, max_length=10_000)
    input: DatasetInput | None = Field(
        None,
        description="Questions from a dataset instead (JSONL, CSV, Parquet, a cached HF dataset or another task's "
        "lines): the 'question' column unless columns.prompt names another; one result line per row.",
    )
    inference: Sampling = Field(default_factory=Sampling)

    @field_validator("questions")
    @classmethod
    def _questions(cls, value: list[str]) -> list[str]:
        for index, question in enumerate(value):
            if not question.strip():
                raise ValueError(f"question {index} is empty; remove it or give it text")
        return value

    @model_validator(mode="after")
    def _one_question_source(self) -> RagSpec:
        if bool(self.questions) == (self.input is not None):
            raise ValueError("give the questions inline ('questions') or from a dataset ('input'), one of the two")
        if self.input is not None and self.input.columns.messages is not None:
            raise ValueError("input.columns.messages does not apply to questions; name the column with columns.prompt")
        return self

    @model_validator(mode="after")
    def _corpus(self) -> RagSpec:
        options = self.hyperparameters
        if not self.documents and options.collection is None and options.collection_from is None:
            raise ValueError(
                "no documents; give 'documents' to index, or hyperparameters.collection naming an existing collection"
            )
        if not self.documents and self.hyperparameters.collection_reset:
            raise ValueError(
                "collection_reset with no documents would leave the collection empty; give the documents "
                "to index it again from"
            )
        return self
