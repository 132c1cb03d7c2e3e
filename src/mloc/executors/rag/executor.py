"""The ``rag_inference`` executor: index documents, retrieve chunks per question, answer with an LLM.

Embeddings come from sentence-transformers, vectors live in Chroma or FAISS, and the answers come
from MLOC's own LLM engines (vLLM or transformers), so a RAG task generates exactly as an inference
task on the same model would. Heavy libraries are imported when a task runs, not with this module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import Executor, RunContext
from mloc.executors.rag.engines import EngineHolder
from mloc.spec.rag import RagOptions, RagSpec
from mloc.spec.sampling import Message, Sampling

if TYPE_CHECKING:
    from mloc.executors.rag.embeddings import Embedder
    from mloc.executors.rag.stores import Hit, VectorStore
    from mloc.llm.base import LLMEngine

EMBED_BATCH = 256
GENERATE_BATCH = 16
COMPLETION_STOPS = ("\nQuestion:", "\nContext:")


def vectors_dir(ctx: RunContext) -> Path:
    """Where persistent collections live on this worker: MLOC_VECTORS_DIR, else beside its models folder."""
    from mloc.settings import Settings

    return Settings().vectors_dir or ctx.models_dir.parent / "vectors"


def format_context(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{number}] ({hit.source})\n{hit.text}" for number, hit in enumerate(hits, start=1))


class Retriever:
    """Embeds questions and searches one open store; shared with the agent's retriever tool."""

    def __init__(self, embedder: Embedder, store: VectorStore) -> None:
        self.embedder = embedder
        self.store = store

    def search(self, questions: Sequence[str], k: int, min_score: float | None = None) -> list[list[Hit]]:
        results = self.store.search(self.embedder.embed(questions), k)
        if min_score is None:
            return results
        return [[hit for hit in hits if hit.score >= min_score] for hits in results]


class RagExecutor(Executor):
    name = "rag_inference"
    task_types = ("rag_inference",)
    isolation = "process"
    requires = ("torch", "transformers", "sentence_transformers", "chromadb")

    def __init__(self, cache_bytes: int | None = None) -> None:
        self.engines = EngineHolder(cache_bytes)
        self._embedders: dict[str, Embedder] = {}

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The LLM engines answers can be generated with, so a task naming one lands where it exists."""
        from mloc.llm.loader import available_engines

        return {"engines": available_engines()}

    def warm_models(self) -> list[str]:
        return self.engines.warm_models()

    def close(self) -> None:
        self.engines.close()
        self._embedders.clear()

    def embedder(self, name: str) -> Embedder:
        """The embedding model, loaded once per executor process."""
        embedder = self._embedders.get(name)
        if embedder is None:
            from mloc.executors.rag.embeddings import Embedder

            embedder = self._embedders[name] = Embedder(name)
        return embedder

    @contextlib.contextmanager
    def open_collection(self, options: RagOptions, root: Path) -> Iterator[VectorStore]:
        """The task's collection, locked while in use when it is a shared, named one."""
        from mloc.executors.rag.stores import collection_lock, open_store

        if options.vector_db == "faiss":
            _require("faiss", "faiss-cpu", "vector_db: faiss")
        embedder = self.embedder(options.embedding_model)
        lock = (
            collection_lock(root, options.vector_db, options.collection)
            if options.collection
            else contextlib.nullcontext()
        )
        with lock:
            store = open_store(
                options.vector_db,
                options.collection,
                root,
                embedding_model=options.embedding_model,
                dimension=embedder.dimension,
            )
            try:
                yield store
            finally:
                store.close()

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, RagSpec):
            raise ExecutionError(f"the rag_inference executor got a {spec.task_type!r} task")
        from mloc.executors.rag.documents import chunk_documents, load_documents

        options = spec.hyperparameters
        started = time.perf_counter()
        documents = load_documents(spec.documents)
        chunks = chunk_documents(documents, options.chunk_size, options.chunk_overlap)
        if documents and not chunks:
            names = ", ".join(document.source for document in documents[:5])
            raise ExecutionError(f"the documents contain no text to index ({names}); give documents with text")
        ctx.log(f"{len(documents)} documents, {len(chunks)} chunks")
        embedder = self.embedder(options.embedding_model)
        with self.open_collection(options, vectors_dir(ctx)) as store:
            added = self._index(ctx, store, embedder, chunks)
            total = store.count()
            if total == 0:
                raise ExecutionError(
                    f"collection {options.collection!r} ({options.vector_db}) is empty or does not exist; "
                    "give 'documents' to index"
                )
            ctx.check_cancelled()
            hits = Retriever(embedder, store).search(spec.questions, options.retrieval_k, options.min_score)
        indexed_sec = time.perf_counter() - started

        engine = self.engines.engine(spec.model, ctx)
        sampling = _sampling(spec.inference, engine, options)
        prompts = []
        for question, question_hits in zip(spec.questions, hits, strict=True):
            prompt, kept = build_prompt(engine, options, question, question_hits, sampling.max_tokens)
            prompts.append(prompt)
            del question_hits[kept:]
        generations = []
        for start in range(0, len(prompts), GENERATE_BATCH):
            ctx.check_cancelled()
            generations.extend(
                engine.generate(prompts[start : start + GENERATE_BATCH], sampling, cancel=ctx.cancel_event)
            )
            ctx.check_cancelled()
            ctx.progress(min(start + GENERATE_BATCH, len(prompts)), len(prompts), "answering")

        prompt_tokens = sum(gen.prompt_tokens for per_prompt in generations for gen in per_prompt[:1])
        completion_tokens = sum(gen.completion_tokens for per_prompt in generations for gen in per_prompt)
        ctx.add_usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, embedded_chunks=added)
        answers = []
        items = []
        for index, (question, question_hits, per_prompt) in enumerate(
            zip(spec.questions, hits, generations, strict=True)
        ):
            first = per_prompt[0]
            answer: dict[str, Any] = {
                "index": index,
                "question": question,
                "answer": first.output.strip(),
                "finish_reason": first.finish_reason,
                "sources": [hit.to_dict() for hit in question_hits],
            }
            if len(per_prompt) > 1:
                answer["alternatives"] = [gen.output.strip() for gen in per_prompt[1:]]
            answers.append(answer)
            items.append({"index": index, "output": first.output, "finish_reason": first.finish_reason})
        latency = time.perf_counter() - started
        return {
            "ok": True,
            "model": engine.model_id,
            "engine": engine.name,
            "embedding_model": options.embedding_model,
            "vector_db": options.vector_db,
            "collection": options.collection,
            "index": {
                "documents": len(documents),
                "chunks": len(chunks),
                "chunks_embedded": added,
                "chunks_reused": len(chunks) - added,
                "collection_size": total,
                "seconds": round(indexed_sec, 3),
            },
            "answers": answers,
            "items": items,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "latency_sec": round(latency, 3),
                "num_requests": len(prompts),
                "embedded_chunks": added,
            },
        }

    def _index(self, ctx: RunContext, store: VectorStore, embedder: Embedder, chunks: Sequence[Any]) -> int:
        """Embed and add the chunks the collection lacks; returns how many were embedded."""
        unique = list({chunk.id: chunk for chunk in chunks}.values())
        missing = store.missing([chunk.id for chunk in unique])
        todo = [chunk for chunk in unique if chunk.id in missing]
        if not todo:
            if unique:
                ctx.log(f"collection {store.name!r} already holds all {len(unique)} chunks; nothing to embed")
            return 0
        for start in range(0, len(todo), EMBED_BATCH):
            ctx.check_cancelled()
            batch = todo[start : start + EMBED_BATCH]
            store.add(batch, embedder.embed([chunk.text for chunk in batch]))
            ctx.progress(start + len(batch), len(todo), "embedding")
        ctx.log(f"embedded {len(todo)} chunks into {store.kind} collection {store.name!r}")
        return len(todo)


def build_prompt(
    engine: LLMEngine, options: RagOptions, question: str, hits: Sequence[Hit], max_tokens: int
) -> tuple[str, int]:
    """The prompt for one question and how many of its chunks it kept: the lowest-ranked go first
    until the context fits ``max_context_tokens`` and the whole prompt fits the model."""
    limit = engine.max_context - max_tokens if engine.max_context else None
    kept = len(hits)
    while True:
        if options.prompt_template is not None:
            # Base models copy "[1] (source)" labels into their answer, so completion prompts get
            # the passages alone.
            context = "\n\n".join(hit.text for hit in hits[:kept])
            prompt = options.prompt_template.replace("{context}", context).replace("{question}", question)
        else:
            context = format_context(hits[:kept])
            prompt = engine.render_chat(
                [
                    Message(role="system", content=options.system_prompt),
                    Message(role="user", content=f"Context:\n{context}\n\nQuestion: {question}"),
                ]
            )
        too_long = (
            options.max_context_tokens is not None and engine.count_tokens(context) > options.max_context_tokens
        ) or (limit is not None and engine.count_tokens(prompt) > limit)
        if not too_long:
            return prompt, kept
        if kept == 0:
            raise ExecutionError(
                f"the question {question[:60]!r} does not fit model {engine.model_id!r}'s context of "
                f"{engine.max_context} tokens with max_tokens {max_tokens}; shorten it or lower max_tokens"
            )
        kept -= 1


def _sampling(inference: Sampling, engine: LLMEngine, options: RagOptions) -> Sampling:
    """Stop at the next turn: plain-turn chats and completion templates would otherwise run on."""
    from mloc.llm.text import PLAIN_TURN_STOPS

    extra: Sequence[str] = ()
    if options.prompt_template is not None:
        extra = COMPLETION_STOPS
    elif not engine.has_chat_template:
        extra = PLAIN_TURN_STOPS
    stops = [*inference.stop, *(stop for stop in extra if stop not in inference.stop)]
    return inference.model_copy(update={"stop": stops})


def _require(module: str, package: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExecutionError(f"{what} needs the '{package}' package on the worker: pip install {package}")
