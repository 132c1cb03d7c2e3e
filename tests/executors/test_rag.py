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
    assert result["index"]["chunks_embedded"] == 5 and result["collection"] is None
    # An unnamed collection is temporary: nothing is left on disk.
    assert not (tmp_path / "vectors" / "chroma").exists() or not any(
        (tmp_path / "vectors" / "chroma").glob("*/data_level0.bin")
    )


def test_named_chroma_collection_is_indexed_once_and_reopened_by_a_new_process(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    data = task(tiny_lm, collection="facts")
    first, _ = run_task(executor, data, tmp_path)
    assert first["index"]["chunks_embedded"] == 5

    embedded_before = executor.embedder("sentence-transformers/all-MiniLM-L6-v2").embedded
    second, _ = run_task(executor, data, tmp_path)
    assert second["index"] == {
        **second["index"],
        "chunks_embedded": 0,
        "chunks_reused": 5,
        "collection_size": 5,
    }
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
    assert reopened["chunks_embedded"] == 0 and reopened["collection_size"] == 5
    assert reopened["top"] == "penguin"


def test_faiss_collection_persists_and_new_documents_are_added_incrementally(
    executor: RagExecutor, tiny_lm: Path, tmp_path: Path
) -> None:
    first, _ = run_task(executor, task(tiny_lm, vector_db="faiss", collection="facts-faiss"), tmp_path)
    assert first["vector_db"] == "faiss" and first["index"]["chunks_embedded"] == 5
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
    assert second["index"]["chunks_embedded"] == 1 and second["index"]["collection_size"] == 6
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
    assert result["index"]["documents"] == 3
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
    from mloc.executors.rag.documents import split_text

    text = " ".join(f"Sentence number {n} says something." for n in range(60))
    chunks = split_text(text, 120, 40)
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
    for path, expected in ((blob, "binary file"), (latin, "not UTF-8")):
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
    with pytest.raises(ExecutionError, match="embedding_model 'nobody/no-such-embedder' could not be loaded"):
        run_task(executor, task(tiny_lm, embedding_model="nobody/no-such-embedder"), tmp_path)


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
