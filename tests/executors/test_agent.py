"""agent_inference: the LangChain agent loop with real tools (sandboxed Python, web search, retriever).

Where the point is the agent's plumbing, the LLM is scripted (a LangChain fake chat model that emits
native tool calls, or an engine that returns fixed ReAct text); everything else is real.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.extras import skip_module_without

skip_module_without("agent", "inference")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402

import mloc.spec  # noqa: E402
from mloc.errors import ExecutionError, SpecError, TaskCancelled  # noqa: E402
from mloc.executors.agent import AgentExecutor  # noqa: E402
from mloc.executors.agent.chat_model import EngineChatModel  # noqa: E402
from mloc.executors.agent.protocol import parse_reply  # noqa: E402
from mloc.executors.base import RunContext  # noqa: E402
from mloc.llm.base import Generation, LLMEngine, Samplings  # noqa: E402
from mloc.spec.agent import AgentSpec  # noqa: E402
from mloc.spec.sampling import Message  # noqa: E402
from tests.support.tiny_model import build_tiny_causal_lm  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ScriptedChatModel(GenericFakeChatModel):
    """Replies with the scripted messages in order; tool binding is a no-op so tool calls pass through."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage(
        content=f"I will use {name}.", tool_calls=[{"name": name, "args": args, "id": f"c-{name}-{id(args)}"}]
    )


class ScriptedEngine(LLMEngine):
    """An engine whose completions are fixed text, to drive the text tool-call protocol."""

    name = "scripted"
    model_id = "scripted-react"
    max_context = 4096

    def __init__(self, replies: list[str]) -> None:
        self.replies = iter(replies)
        self.prompts: list[str] = []

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Samplings,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        self.prompts.extend(prompts)
        out = next(self.replies)
        return [[Generation(0, out, "stop", len(prompts[0].split()), len(out.split()))]]

    def render_chat(self, messages: Sequence[Message]) -> str:
        return "".join(f"<{m.role}>{m.content}</{m.role}>\n" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def agent_task(**spec: Any) -> dict[str, Any]:
    hyper = {"max_steps": 4, "tool_timeout_sec": 5, **spec.pop("hyperparameters", {})}
    return {
        "apiVersion": "mloc/v1",
        "kind": "AgentTask",
        "metadata": {"name": "agent-test", "owner": "tester"},
        "spec": {
            "taskType": "agent_inference",
            "hyperparameters": hyper,
            "inference": {"max_tokens": 16, "temperature": 0},
            **spec,
        },
    }


def run_agent(
    executor: AgentExecutor, data: dict[str, Any], root: Path, events: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the task; ``events`` (given) collects what it reported, also when it fails."""
    events = [] if events is None else events
    ctx = RunContext(
        task_id="a1",
        attempt=1,
        owner="tester",
        document=mloc.spec.load(json.dumps(data)),
        out_dir=root / "results" / "a1",
        models_dir=root / "models",
        worker_id="w1",
        emit=events.append,
    )
    return executor.run(ctx), events


def scripted(*replies: AIMessage) -> AgentExecutor:
    return AgentExecutor(chat_model_factory=lambda spec, ctx: ScriptedChatModel(messages=iter(replies)))


@pytest.fixture
def python_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOC_ALLOW_PYTHON_TOOL", "1")


def test_native_tool_calls_run_the_python_tool_in_the_sandbox(python_allowed: None, tmp_path: Path) -> None:
    executor = scripted(
        call("python_repl", code="import os\nprint(6 * 7, os.getcwd() != '/')"),
        AIMessage(content="The answer is 42."),
    )
    result, events = run_agent(
        executor, agent_task(input="What is 6 times 7?", hyperparameters={"tools": ["python_repl"]}), tmp_path
    )

    assert result["final_answer"] == "The answer is 42." and result["stop_reason"] == "final_answer"
    [step] = result["steps"]
    assert step["tool"] == "python_repl" and step["output"] == "42 True" and step["error"] is False
    assert step["input"].startswith("import os")
    assert result["items"] == [{"index": 0, "output": "The answer is 42.", "finish_reason": "final_answer"}]
    assert result["usage"]["tool_calls"] == 1 and result["usage"]["num_requests"] == 2
    assert any(event["ev"] == "usage" and event["counters"]["tool_calls"] == 1 for event in events)
    # Its steps were counted against max_steps, a ceiling: the answer completes the run.
    reported = [(e["step"], e["total"], e["message"]) for e in events if e["ev"] == "progress"]
    assert reported[0][:2] == (1, 4) and reported[-1] == (1, 1, "answered after 1 tool call")


class CancelledMidGeneration(ScriptedEngine):
    """An engine cancelled while it generates: as vLLM aborted between steps, it answers with nothing."""

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Samplings,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        assert cancel is not None
        cancel.set()
        return []


def test_a_cancel_during_generation_ends_the_run_as_cancelled_not_with_a_traceback(tmp_path: Path) -> None:
    engine = CancelledMidGeneration([])
    executor = AgentExecutor(
        chat_model_factory=lambda spec, ctx: EngineChatModel(
            engine=engine, sampling=spec.inference, cancel=ctx.cancel_event
        )
    )
    with pytest.raises(TaskCancelled, match="the task was cancelled"):
        run_agent(executor, agent_task(input="Count to a million."), tmp_path)


def test_text_protocol_drives_tools_and_feeds_observations_back(python_allowed: None, tmp_path: Path) -> None:
    engine = ScriptedEngine(
        [
            " I should divide by zero to check.\nAction: python_repl\nAction Input: 1 / 0",
            " That failed. Let me compute it properly.\nAction: python_repl\n"
            "Action Input:\n```python\nprint(17 * 23)\n```\nObservation: 999",
            " I know the answer\nFinal Answer: 391",
        ]
    )
    executor = AgentExecutor(
        chat_model_factory=lambda spec, ctx: EngineChatModel(engine=engine, sampling=spec.inference)
    )
    data = agent_task(
        messages=[
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! What shall I compute?"},
            {"role": "user", "content": "What is 17 * 23?"},
        ],
        hyperparameters={"tools": ["python_repl"]},
    )
    result, _ = run_agent(executor, data, tmp_path)

    assert result["final_answer"] == "391"
    first, second = result["steps"]
    assert first["error"] is True and "ZeroDivisionError" in first["output"]
    assert second["input"] == "print(17 * 23)" and second["output"] == "391" and not second["error"]
    assert second["thought"] == "That failed. Let me compute it properly."
    # The conversation, the tool instructions and each observation reach the model's next prompt.
    assert engine.prompts[0].startswith("<system>You are a helpful assistant.")
    assert "\n\nBe exact.\n\n" in engine.prompts[0] and "Action Input:" in engine.prompts[0]
    assert "<assistant>Hello! What shall I compute?</assistant>" in engine.prompts[0]
    assert "Observation: Traceback" in engine.prompts[1] and "ZeroDivisionError" in engine.prompts[1]
    assert engine.prompts[2].endswith("Action Input: print(17 * 23)\nObservation: 391\nThought:")
    # The hallucinated "Observation: 999" in the second reply was never used.
    assert "999" not in engine.prompts[2]
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["num_requests"] == 3


@pytest.mark.parametrize(
    ("text", "tool", "arguments", "final"),
    [
        # What a small instruction-tuned model writes, including a hallucinated observation after the input.
        (
            "Thought: I need to calculate the product.\n"
            "Action: python_repl\nAction Input: print(12*11)\nObservation: 132",
            "python_repl",
            {"code": "print(12*11)"},
            None,
        ),
        (
            'Thought: search it\nAction: `web_search`\nAction Input: "capital of Peru"\n',
            "web_search",
            {"query": "capital of Peru"},
            None,
        ),
        (
            "Thought: I will call a tool.\n<tool_call>\n"
            '{"name": "python_repl", "arguments": {"code": "print(1)"}}\n</tool_call>',
            "python_repl",
            {"code": "print(1)"},
            None,
        ),
        (
            '{"name": "web_search", "arguments": "weather in Oslo"}',
            "web_search",
            {"query": "weather in Oslo"},
            None,
        ),
        (
            "Thought: I know it.\nFinal Answer: Lima is the capital of Peru.",
            None,
            None,
            "Lima is the capital of Peru.",
        ),
        ("Paris is the capital of France.", None, None, "Paris is the capital of France."),
    ],
)
def test_text_tool_calls_are_parsed_from_model_output(
    text: str, tool: str | None, arguments: dict[str, str] | None, final: str | None
) -> None:
    reply = parse_reply(text, {"python_repl": "code", "web_search": "query"})
    if tool is None:
        assert reply.calls == () and reply.final == final
    else:
        assert [(c.name, c.arguments) for c in reply.calls] == [(tool, arguments)]


def test_real_tiny_model_runs_the_agent_loop_end_to_end(tmp_path: Path, python_allowed: None) -> None:
    model = build_tiny_causal_lm(tmp_path / "tiny-agent", chat_template=True)
    executor = AgentExecutor()
    data = agent_task(
        input="What is 2 + 2?",
        model={"source": {"type": "local", "identifier": str(model)}, "engine": "transformers"},
        hyperparameters={"tools": ["python_repl"], "max_steps": 2},
        inference={"max_tokens": 12, "temperature": 0},
    )
    try:
        result, _ = run_agent(executor, data, tmp_path)
    finally:
        executor.close()
    # Random weights write junk, which the protocol reads as a direct answer; the usage is real.
    assert result["model"] == str(model)
    assert result["stop_reason"] == "final_answer" and result["final_answer"]
    assert result["usage"]["prompt_tokens"] > 50 and result["usage"]["completion_tokens"] > 0


def logged(events: list[dict[str, Any]]) -> list[str]:
    return [event["message"] for event in events if event["ev"] == "log"]


def test_an_agent_stopped_at_max_steps_fails_naming_the_limit_and_logs_its_steps(
    python_allowed: None, tmp_path: Path
) -> None:
    executor = scripted(*(call("python_repl", code=f"print({n})") for n in range(10)))
    events: list[dict[str, Any]] = []
    with pytest.raises(ExecutionError) as stopped:
        run_agent(
            executor,
            agent_task(input="count", hyperparameters={"tools": ["python_repl"], "max_steps": 3}),
            tmp_path,
            events,
        )
    assert stopped.value.message == (
        "stopped at max_steps=3: the agent made 3 tool call(s) and asked for more without giving a final answer; "
        "raise hyperparameters.max_steps, or show the model when to answer (worked examples in messages, a "
        "clearer system_prompt); its 3 step(s) are in `mloc logs a1`"
    )
    # The task has no result: its log holds each step, and its usage counts what the run spent.
    assert [line for line in logged(events) if line.startswith("step ")] == [
        "step 1: python_repl('print(0)') -> 0",
        "step 2: python_repl('print(1)') -> 1",
        "step 3: python_repl('print(2)') -> 2",
    ]
    [usage] = [event["counters"] for event in events if event["ev"] == "usage"]
    assert usage["tool_calls"] == 3


def test_an_agent_stopped_at_max_steps_through_the_text_protocol_logs_failed_steps_too(
    python_allowed: None, tmp_path: Path
) -> None:
    engine = ScriptedEngine(
        [
            " Divide first.\nAction: python_repl\nAction Input: 1 / 0",
            " Then print a long line.\nAction: python_repl\nAction Input: print('x' * 500)",
            " One more.\nAction: python_repl\nAction Input: print(3)",
        ]
    )
    executor = AgentExecutor(
        chat_model_factory=lambda spec, ctx: EngineChatModel(engine=engine, sampling=spec.inference)
    )
    events: list[dict[str, Any]] = []
    data = agent_task(input="compute", hyperparameters={"tools": ["python_repl"], "max_steps": 2})
    with pytest.raises(ExecutionError, match=r"^stopped at max_steps=2: the agent made 2 tool call\(s\)"):
        run_agent(executor, data, tmp_path, events)
    first, second = [line for line in logged(events) if line.startswith("step ")]
    assert first.startswith("step 1: python_repl('1 / 0') failed: Traceback") and "ZeroDivisionError" in first
    # An output is cut in the log (the result of an answered run keeps it whole), on one line.
    assert second == "step 2: python_repl(\"print('x' * 500)\") -> " + "x" * 297 + "..."


def test_repeating_the_same_call_is_stopped_as_a_loop(python_allowed: None, tmp_path: Path) -> None:
    executor = scripted(*(call("python_repl", code="print('again')") for _ in range(10)))
    events: list[dict[str, Any]] = []
    with pytest.raises(ExecutionError) as stopped:
        run_agent(
            executor,
            agent_task(input="loop", hyperparameters={"tools": ["python_repl"], "max_steps": 8}),
            tmp_path,
            events,
        )
    assert stopped.value.message.startswith(
        "stopped as a loop: the agent asked for the same call, python_repl(\"print('again')\"), 3 times in a row "
        "without a final answer (the last one was not run); a higher max_steps would not help"
    )
    assert stopped.value.message.endswith("; its 2 step(s) are in `mloc logs a1`")
    assert len([line for line in logged(events) if line.startswith("step ")]) == 2


def test_an_empty_last_reply_is_no_answer_and_fails(tmp_path: Path) -> None:
    executor = scripted(AIMessage(content="  "))
    with pytest.raises(ExecutionError, match=r"^the model's last reply held neither a tool call nor any text"):
        run_agent(executor, agent_task(input="say nothing"), tmp_path)


def test_python_tool_is_refused_unless_the_worker_allows_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLOC_ALLOW_PYTHON_TOOL", raising=False)
    executor = scripted(AIMessage(content="unused"))
    with pytest.raises(ExecutionError, match="MLOC_ALLOW_PYTHON_TOOL=1"):
        run_agent(executor, agent_task(input="hi", hyperparameters={"tools": ["python_repl"]}), tmp_path)


def test_model_calling_an_unknown_tool_gets_an_error_and_continues(tmp_path: Path) -> None:
    executor = scripted(call("rm_rf", path="/"), AIMessage(content="I cannot do that."))
    result, _ = run_agent(
        executor, agent_task(input="delete everything", hyperparameters={"tools": ["web_search"]}), tmp_path
    )
    [step] = result["steps"]
    assert step["error"] is True and "rm_rf is not a valid tool" in step["output"]
    assert result["final_answer"] == "I cannot do that."


def test_web_search_without_a_provider_or_network_is_a_clear_tool_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLOC_WEB_SEARCH_PROVIDER", raising=False)
    executor = scripted(call("web_search", query="mloc"), AIMessage(content="done"))
    result, _ = run_agent(executor, agent_task(input="search", hyperparameters={"tools": ["web_search"]}), tmp_path)
    assert result["steps"][0]["error"] and "no search provider on this worker" in result["steps"][0]["output"]

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLOC_WEB_SEARCH_PROVIDER", "searxng")
    monkeypatch.setenv("MLOC_SEARXNG_URL", f"http://127.0.0.1:{port}")
    executor = scripted(call("web_search", query="mloc"), AIMessage(content="done"))
    result, _ = run_agent(executor, agent_task(input="search", hyperparameters={"tools": ["web_search"]}), tmp_path)
    assert result["steps"][0]["error"] and f"could not reach http://127.0.0.1:{port}" in result["steps"][0]["output"]


@pytest.fixture
def searxng() -> Iterator[str]:
    """A local HTTP server that answers like SearXNG's JSON API."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {"results": [{"title": "MLOC", "url": "https://mloc.dev", "content": f"query was {self.path}"}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_web_search_through_a_searxng_provider(monkeypatch: pytest.MonkeyPatch, searxng: str, tmp_path: Path) -> None:
    monkeypatch.setenv("MLOC_WEB_SEARCH_PROVIDER", "searxng")
    monkeypatch.setenv("MLOC_SEARXNG_URL", searxng)
    executor = scripted(call("web_search", query="control plane"), AIMessage(content="found it"))
    result, _ = run_agent(executor, agent_task(input="search", hyperparameters={"tools": ["web_search"]}), tmp_path)
    output = result["steps"][0]["output"]
    assert not result["steps"][0]["error"]
    assert "1. MLOC (https://mloc.dev)" in output and "q=control+plane" in output


def test_retriever_tool_searches_a_collection_a_rag_task_indexed(tmp_path: Path) -> None:
    from langchain_core.documents import Document

    from mloc.executors.rag import RagExecutor, vectors_dir
    from mloc.executors.rag.sync import sync_collection
    from mloc.spec.rag import RagOptions

    rag = RagExecutor()
    options = RagOptions.model_validate({"vector_db": "faiss", "collection": "handbook"})
    facts = ["The office wifi password rotates every Monday.", "Lunch is served at noon in the atrium."]
    documents = [Document(page_content=text, metadata={"source": f"handbook/{n}.md"}) for n, text in enumerate(facts)]
    with rag.open_collection(options, tmp_path / "vectors") as store:
        sync_collection(store, documents, chunk_size=500, chunk_overlap=50)
    assert (
        vectors_dir(
            RunContext(
                "x",
                1,
                "o",
                mloc.spec.load(json.dumps(agent_task(input="x"))),
                tmp_path,
                tmp_path / "models",
                "w",
            )
        )
        == tmp_path / "vectors"
    )

    executor = scripted(call("retriever", query="When is lunch?"), AIMessage(content="At noon."))
    executor._rag = rag
    data = agent_task(
        input="When is lunch?",
        hyperparameters={
            "tools": ["retriever"],
            "retriever_collection": "handbook",
            "retriever_vector_db": "faiss",
            "retrieval_k": 1,
        },
    )
    result, _ = run_agent(executor, data, tmp_path)
    output = result["steps"][0]["output"]
    assert output.startswith("[1] (handbook/1.md, score") and "Lunch is served at noon" in output

    missing = agent_task(input="x", hyperparameters={"tools": ["retriever"], "retriever_collection": "nope"})
    with pytest.raises(ExecutionError, match="retriever_collection 'nope' \\(chromadb\\) does not exist"):
        run_agent(scripted(AIMessage(content="x")), missing, tmp_path)


def test_spec_rejects_bad_agent_input() -> None:
    with pytest.raises(SpecError, match="tools"):
        mloc.spec.load(json.dumps(agent_task(input="x", hyperparameters={"tools": ["shell"]})))
    with pytest.raises(SpecError, match="retriever_collection"):
        mloc.spec.load(json.dumps(agent_task(input="x", hyperparameters={"tools": ["retriever"]})))
    with pytest.raises(SpecError, match="last message must be from the user"):
        mloc.spec.load(
            json.dumps(agent_task(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
        )
    document = mloc.spec.load(
        json.dumps(agent_task(input="x", hyperparameters={"tools": ["web_search", "web_search"]}))
    )
    assert isinstance(document.spec, AgentSpec) and document.spec.hyperparameters.tools == ["web_search"]


def test_worker_advertises_only_the_tools_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLOC_ALLOW_PYTHON_TOOL", raising=False)
    monkeypatch.delenv("MLOC_WEB_SEARCH_PROVIDER", raising=False)
    assert AgentExecutor.capabilities()["agent_tools"] == ["retriever"]
    monkeypatch.setenv("MLOC_ALLOW_PYTHON_TOOL", "1")
    monkeypatch.setenv("MLOC_WEB_SEARCH_PROVIDER", "searxng")
    capabilities = AgentExecutor.capabilities()
    assert capabilities["agent_tools"] == ["retriever", "python_repl", "web_search"]
    assert "transformers" in capabilities["engines"]
    # The retriever searches the RAG executor's store: a pipeline step using a collection that a rag step
    # indexed needs that store (mloc.orchestrator.pipelines.needs_at_release), and finds it here.
    from mloc.executors.rag import RagExecutor

    assert capabilities["vector_stores"] == RagExecutor.capabilities()["vector_stores"] != []
