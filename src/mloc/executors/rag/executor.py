"""The ``rag_inference`` executor: index documents, retrieve chunks per question, answer with an LLM.

Indexing is LangChain's: a document loader, ``RecursiveCharacterTextSplitter``, sentence-transformers
through ``HuggingFaceEmbeddings``, and a Chroma (``langchain_chroma``) or FAISS vector store; a named
collection follows its documents from task to task (``sync.py``). The answers come from MLOC's own
LLM engines (vLLM or transformers), so a RAG task generates exactly as an inference task on the same
model would, and each answer lists the chunks it was given. Heavy libraries are imported when a task
runs, not with this module.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.engines import EngineExecutor
from mloc.executors.rag.engines import answer_workload
from mloc.spec.rag import RagOptions, RagSpec
from mloc.spec.sampling import Message, Sampling

if TYPE_CHECKING:
    from mloc.executors.rag.embeddings import Embedder
    from mloc.executors.rag.stores import Collection, Hit
    from mloc.llm.base import LLMEngine

GENERATE_BATCH = 16
# What each result item repeats of its sources; the answers list keeps the full chunk text too.
BRIEF_SOURCE_KEYS = ("rank", "source", "chunk", "score", "excerpt")
COMPLETION_STOPS = ("\nQuestion:", "\nContext:")


def vectors_dir(ctx: RunContext) -> Path:
    """Where persistent collections live on this worker (``Settings.resolved_vectors_dir``)."""
    from mloc.settings import Settings

    return Settings().resolved_vectors_dir(ctx.models_dir)


def vector_store(folder: Path) -> str:
    """The name of a vectors folder across the fleet (host:path): a task that uses a collection another
    task indexed is placed on a worker that advertises the same one."""
    return f"{socket.gethostname()}:{folder.expanduser().resolve()}"


def format_context(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{number}] ({hit.source})\n{hit.text}" for number, hit in enumerate(hits, start=1))


class Retriever:
    """Embeds questions (in one batch) and searches one open collection; shared with the agent's retriever tool."""

    def __init__(self, embedder: Embedder, store: Collection) -> None:
        self.embedder = embedder
        self.store = store

    def search(self, questions: Sequence[str], k: int, min_score: float | None = None) -> list[list[Hit]]:
        results = self.store.search(self.embedder.embed_documents(list(questions)), k)
        if min_score is None:
            return results
        return [[hit for hit in hits if hit.score >= min_score] for hits in results]


class RagExecutor(EngineExecutor):
    name = "rag_inference"
    task_types = ("rag_inference",)
    isolation = "process"
    requires = (
        "torch",
        "transformers",
        "sentence_transformers",
        "chromadb",
        "langchain_chroma",
        "langchain_huggingface",
        "langchain_text_splitters",
    )

    def __init__(self, cache_bytes: int | None = None) -> None:
        super().__init__(cache_bytes)
        self._embedders: dict[str, Embedder] = {}

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The LLM engines answers can be generated with, so a task naming one lands where it exists."""
        from mloc.llm.loader import available_engines
        from mloc.settings import Settings

        folder = Settings().resolved_vectors_dir()
        return {"engines": available_engines(), "vector_stores": [vector_store(folder)]}

    def close(self) -> None:
        super().close()
        self._embedders.clear()

    def embedder(self, name: str) -> Embedder:
        """The embedding model, loaded once per executor process."""
        embedder = self._embedders.get(name)
        if embedder is None:
            from mloc.executors.rag.embeddings import Embedder

            embedder = self._embedders[name] = Embedder(name)
        return embedder

    @contextlib.contextmanager
    def open_collection(self, options: RagOptions, root: Path, *, reset: bool = False) -> Iterator[Collection]:
        """The task's collection, locked while in use when it is a shared, named one; ``reset``
        empties a named one first."""
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
            store = open_store(options.vector_db, options.collection, root, embedder=embedder, reset=reset)
            try:
                yield store
            finally:
                store.close()

    def _answer_rows(self, ctx: RunContext, spec: RagSpec, retriever: Retriever) -> dict[str, Any]:
        """Questions from a dataset, a batch at a time (see :mod:`.questions`)."""
        from mloc.executors.rag.questions import answer_rows

        options = spec.hyperparameters
        loaded: list[LLMEngine] = []

        def engine(questions: Sequence[str] = (), hits: Sequence[Sequence[Hit]] = ()) -> LLMEngine:
            if not loaded:  # sized by the first batch, then kept for the rest
                workload = answer_workload(spec, hits, GENERATE_BATCH, questions=questions) if questions else None
                loaded.append(self.engines.engine(spec.model, ctx, workload=workload))
            return loaded[0]

        def answer(questions: list[str], hits: list[list[Hit]]) -> list[tuple[str, str | None, int, int, Any]]:
            llm = engine(questions, hits)
            sampling = _sampling(spec.inference, llm, options)
            prompts = []
            for question, found in zip(questions, hits, strict=True):
                prompt, kept = build_prompt(llm, options, question, found, sampling.max_tokens)
                prompts.append(prompt)
                del found[kept:]
            generations = llm.generate(prompts, sampling, cancel=ctx.cancel_event)
            return [
                (gens[0].output.strip(), gens[0].finish_reason, gens[0].prompt_tokens,
                 sum(g.completion_tokens for g in gens), _brief(found))
                for gens, found in zip(generations, hits, strict=True)
            ]  # fmt: skip

        def search(questions: Sequence[str]) -> list[list[Hit]]:
            return retriever.search(questions, options.retrieval_k, options.min_score)

        return answer_rows(ctx, spec, search, answer, engine, GENERATE_BATCH)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, RagSpec):
            raise ExecutionError(f"the rag_inference executor got a {spec.task_type!r} task")
        from mloc.executors.rag.documents import load_documents
        from mloc.executors.rag.sync import SyncReport, sync_collection

        options = spec.hyperparameters
        started = time.perf_counter()
        documents = load_documents(spec.documents)
        if documents and not any(document.page_content.strip() for document in documents):
            names = ", ".join(str(document.metadata["source"]) for document in documents[:5])
            raise ExecutionError(f"the documents contain no text to index ({names}); give documents with text")
        ctx.log(f"{len(documents)} documents")
        embedder = self.embedder(options.embedding_model)
        with self.open_collection(options, vectors_dir(ctx), reset=options.collection_reset) as store:
            if documents:
                report = sync_collection(
                    store,
                    documents,
                    chunk_size=options.chunk_size,
                    chunk_overlap=options.chunk_overlap,
                    mode=options.collection_sync,
                    reset=options.collection_reset,
                    check_cancelled=ctx.check_cancelled,
                    progress=ctx.progress,
                    log=ctx.log,
                )
            else:
                report = SyncReport(mode="query")
            total = store.count()
            if total == 0:
                raise ExecutionError(
                    f"collection {options.collection!r} ({options.vector_db}) is empty or does not exist; "
                    "give 'documents' to index"
                )
            ctx.check_cancelled()
            retriever = Retriever(embedder, store)
            if spec.input is not None:
                result = self._answer_rows(ctx, spec, retriever)
                ctx.add_usage(embedded_chunks=report.chunks["added"])
                result["usage"]["embedded_chunks"] = report.chunks["added"]
                result["index"] = {**report.to_dict(), "collection_size": total}
                if options.collection:
                    result.update(
                        collection=options.collection,
                        vector_db=options.vector_db,
                        vector_store=vector_store(vectors_dir(ctx)),
                    )
                return result
            hits = retriever.search(spec.questions, options.retrieval_k, options.min_score)
        indexed_sec = time.perf_counter() - started
        added = report.chunks["added"]

        engine = self.engines.engine(spec.model, ctx, workload=answer_workload(spec, hits, GENERATE_BATCH))
        sampling = _sampling(spec.inference, engine, options)
        prompts = []
        for question, question_hits in zip(spec.questions, hits, strict=True):
            prompt, kept = build_prompt(engine, options, question, question_hits, sampling.max_tokens)
            prompts.append(prompt)
            del question_hits[kept:]
        generations = []
        ctx.progress(0, len(prompts), "answering")
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
            sources = [hit.to_dict(rank) for rank, hit in enumerate(question_hits, start=1)]
            answer: dict[str, Any] = {
                "index": index,
                "question": question,
                "answer": first.output.strip(),
                "finish_reason": first.finish_reason,
                "sources": sources,
            }
            if len(per_prompt) > 1:
                answer["alternatives"] = [gen.output.strip() for gen in per_prompt[1:]]
            answers.append(answer)
            # The items every task type has, with what a client needs to print an answer and its sources.
            brief = [{key: source[key] for key in BRIEF_SOURCE_KEYS} for source in sources]
            items.append(
                {
                    "index": index,
                    "question": question,
                    "output": first.output,
                    "finish_reason": first.finish_reason,
                    "sources": brief,
                }
            )
        latency = time.perf_counter() - started
        return {
            "ok": True,
            "model": engine.model_id,
            "engine": engine.name,
            "dtype": engine.dtype,
            "embedding_model": options.embedding_model,
            "vector_db": options.vector_db,
            "collection": options.collection,
            **({"vector_store": vector_store(vectors_dir(ctx))} if options.collection else {}),
            "index": {
                **report.to_dict(),
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


def _brief(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    return [{key: source[key] for key in BRIEF_SOURCE_KEYS} for source in (h.to_dict(r) for r, h in enumerate(hits, 1))]


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
