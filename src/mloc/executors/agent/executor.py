"""The ``agent_inference`` executor: a ReAct agent on LangChain's ``create_agent``.

The model is an MLOC engine behind :class:`~mloc.executors.agent.chat_model.EngineChatModel`, which
parses tool calls from text, so small local models can use tools; a LangChain chat model with native
tool calling can be plugged in instead (``chat_model_factory``). The result carries the final answer,
why the agent stopped, and every step (thought, tool, input, output). LangChain is imported only when
a task runs.

An agent that ends without an answer (stopped at ``max_steps``, stopped as a loop, or an empty last
reply) fails its task, as LangGraph's ``GraphRecursionError`` and the OpenAI Agents SDK's
``MaxTurnsExceeded`` do, rather than succeeding with a placeholder as LangChain's legacy
``AgentExecutor`` does: a script, a pipeline's next step and ``mloc submit --wait`` would read that as
an answer. The reason names the limit and the fix; each step is in the task's log as it ends.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.engines import EngineExecutor
from mloc.spec.agent import AgentSpec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig
    from langchain_core.tools import BaseTool

    from mloc.executors.agent.sandbox import PythonSandbox
    from mloc.executors.rag import RagExecutor

ChatModelFactory = Callable[[AgentSpec, RunContext], "BaseChatModel"]
# The python tool runs model-written code; a worker opts in (a sandbox is never a perfect boundary).
ALLOW_PYTHON_ENV = "MLOC_ALLOW_PYTHON_TOOL"
REPEAT_LIMIT = 3  # identical tool calls in a row that count as a loop
LOGGED_CHARS = 300  # of a step's input and output in its log line; the result keeps them whole


def python_tool_allowed() -> bool:
    from mloc.settings import Settings

    return Settings().allow_python_tool


def conversation(spec: AgentSpec) -> list[BaseMessage]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    messages: list[BaseMessage] = [kinds[message.role](content=message.content) for message in spec.messages]
    if spec.input:
        messages.append(HumanMessage(content=spec.input))
    return messages


class AgentExecutor(EngineExecutor):
    name = "agent_inference"
    task_types = ("agent_inference",)
    isolation = "process"
    requires = ("torch", "transformers", "langchain", "langgraph")

    def __init__(self, cache_bytes: int | None = None, *, chat_model_factory: ChatModelFactory | None = None) -> None:
        super().__init__(cache_bytes)
        self.chat_model_factory = chat_model_factory
        self._rag: RagExecutor | None = None

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The tools this worker offers, so tasks that need python_repl or web_search land where they run;
        and the vector store its retriever reads, so a pipeline step using a collection another step
        indexed lands where that collection is (the RAG executor's store: the retriever searches it)."""
        from mloc.executors.rag import RagExecutor
        from mloc.settings import Settings

        tools = ["retriever"]
        if python_tool_allowed():
            tools.append("python_repl")
        if Settings().web_search_provider.strip():
            tools.append("web_search")
        return {"agent_tools": tools, **RagExecutor.capabilities()}

    def close(self) -> None:
        super().close()
        if self._rag is not None:
            self._rag.close()

    def _chat_model(self, spec: AgentSpec, ctx: RunContext) -> BaseChatModel:
        if self.chat_model_factory is not None:
            return self.chat_model_factory(spec, ctx)
        from mloc.executors.agent.chat_model import EngineChatModel

        return EngineChatModel(
            engine=self.engines.engine(spec.model, ctx), sampling=spec.inference, cancel=ctx.cancel_event
        )

    def _tools(self, spec: AgentSpec, ctx: RunContext, stack: contextlib.ExitStack) -> list[BaseTool]:
        from mloc.executors.agent import tools as agent_tools

        options = spec.hyperparameters
        built: list[BaseTool] = []
        for name in options.tools:
            if name == "python_repl":
                built.append(agent_tools.python_tool(self._sandbox_factory(spec, stack)))
            elif name == "web_search":
                built.append(agent_tools.web_search_tool())
            elif name == "retriever":
                assert options.retriever_collection is not None
                built.append(agent_tools.retriever_tool(self._retriever(spec, ctx), options.retriever_collection))
            else:
                raise ExecutionError(f"unknown tool {name!r}; use python_repl, web_search or retriever")
        return built

    def _sandbox_factory(self, spec: AgentSpec, stack: contextlib.ExitStack) -> Callable[[], PythonSandbox]:
        """The task's sandbox, made on first use and removed with the task."""
        from mloc.executors.agent.sandbox import Limits, PythonSandbox, SandboxUnavailable

        options = spec.hyperparameters
        limits = Limits(timeout_sec=options.tool_timeout_sec, memory_bytes=options.python_memory_mb * 1024 * 1024)
        try:
            sandbox = stack.enter_context(PythonSandbox(limits))
        except SandboxUnavailable as exc:
            raise ExecutionError(f"the python_repl tool cannot run on this worker: {exc}") from exc
        return lambda: sandbox

    def _retriever(self, spec: AgentSpec, ctx: RunContext) -> Callable[[str], list[dict[str, Any]]]:
        from mloc.executors.rag import RagExecutor, Retriever, vectors_dir
        from mloc.executors.rag.stores import existing_embedding_model
        from mloc.spec.rag import RagOptions

        options = spec.hyperparameters
        assert options.retriever_collection is not None
        root = vectors_dir(ctx)
        model = existing_embedding_model(options.retriever_vector_db, options.retriever_collection, root)
        if model is None:
            raise ExecutionError(
                f"retriever_collection {options.retriever_collection!r} ({options.retriever_vector_db}) does "
                "not exist on this worker; index it first with a rag_inference task that sets "
                f"hyperparameters.collection: {options.retriever_collection}"
            )
        rag_options = RagOptions.model_validate(
            {
                "embedding_model": model,
                "vector_db": options.retriever_vector_db,
                "collection": options.retriever_collection,
            }
        )
        if self._rag is None:
            self._rag = RagExecutor()
        rag = self._rag

        def search(query: str) -> list[dict[str, Any]]:
            with rag.open_collection(rag_options, root) as store:
                hits = Retriever(rag.embedder(model), store).search([query], options.retrieval_k)[0]
            return [hit.to_dict() for hit in hits]

        return search

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, AgentSpec):
            raise ExecutionError(f"the agent_inference executor got a {spec.task_type!r} task")
        options = spec.hyperparameters
        if "python_repl" in options.tools and not python_tool_allowed():
            raise ExecutionError(
                "the python_repl tool is disabled on this worker; the worker's operator can allow it with "
                f"{ALLOW_PYTHON_ENV}=1, or remove python_repl from hyperparameters.tools"
            )
        from langchain.agents import create_agent
        from langgraph.errors import GraphRecursionError

        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            tools = self._tools(spec, ctx, stack)
            model = self._chat_model(spec, ctx)
            agent = create_agent(model, tools, system_prompt=options.system_prompt)
            trace = _Trace(ctx, options.max_steps)
            # Our own step limit stops the run first; LangGraph's recursion limit is only a backstop.
            limit = 2 * options.max_steps + 10
            config: RunnableConfig = {"recursion_limit": limit}
            state: Any = {"messages": conversation(spec)}
            try:
                for update in agent.stream(state, config=config, stream_mode="updates"):
                    ctx.check_cancelled()
                    if trace.record(update):
                        break
            except GraphRecursionError:
                trace.stop_at_graph_limit(limit)
            finally:
                # Tokens spent count however the run ends: stopped, cancelled or answered.
                trace.count_usage()
        if not trace.final:
            raise ExecutionError(trace.failure())
        # Each step reported "n of max_steps", a ceiling and not the work to do: an answer completes the
        # run however few steps it took, and its progress says so (not "3/10, 30%" on a succeeded task).
        done = len(trace.steps)
        said = f"answered after {done} tool call{'s' if done != 1 else ''}" if done else "answered without a tool"
        ctx.progress(max(done, 1), max(done, 1), said)
        return trace.result(model, started)


class _Trace:
    """Follows the agent's updates, builds the step list, and decides when to stop early."""

    def __init__(self, ctx: RunContext, max_steps: int) -> None:
        self.ctx = ctx
        self.max_steps = max_steps
        self.steps: list[dict[str, Any]] = []
        self.by_call: dict[str, dict[str, Any]] = {}
        self.final: str | None = None
        self.stop_reason = "no_answer"
        self.stop_message = (
            "the agent ended without a final answer; show the model how to end (worked examples that end in "
            "'Final Answer: ...' in messages) or use a larger model"
        )
        self.model_calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def record(self, update: dict[str, Any]) -> bool:
        """Take one update; True means stop the agent now."""
        from langchain_core.messages import AIMessage, ToolMessage

        for payload in update.values():
            messages = payload.get("messages", []) if isinstance(payload, dict) else []
            for message in messages:
                if isinstance(message, AIMessage):
                    if self._model_message(message):
                        return True
                elif isinstance(message, ToolMessage):
                    step = self.by_call.get(message.tool_call_id)
                    if step is not None:
                        step["output"] = str(message.content)
                        step["error"] = message.status == "error"
                        step["duration_sec"] = round(time.perf_counter() - step.pop("_started"), 3)
                        # A failed task has no result: its log is where its steps can be read.
                        self.ctx.log(f"step {step['step']}: {_step_line(step)}")
        return False

    def _model_message(self, message: Any) -> bool:
        self.model_calls += 1
        usage = message.usage_metadata or {}
        self.prompt_tokens += int(usage.get("input_tokens", 0))
        self.completion_tokens += int(usage.get("output_tokens", 0))
        if not message.tool_calls:
            self.final = str(message.content).strip()
            if self.final:
                self.stop_reason, self.stop_message = "final_answer", "the agent gave its final answer"
            else:
                self.stop_reason = "empty_answer"
                self.stop_message = (
                    "the model's last reply held neither a tool call nor any text, so the agent has no answer; "
                    "show the model the format (worked examples that end in 'Final Answer: ...' in messages) or "
                    "use a larger model"
                )
            return False
        if len(self.steps) >= self.max_steps:
            self.stop_at_limit()
            return True
        for call in message.tool_calls:
            arguments = call["args"]
            step = {
                "step": len(self.steps) + 1,
                "thought": str(message.content).strip(),
                "tool": call["name"],
                "input": next(iter(arguments.values())) if len(arguments) == 1 else arguments,
                "output": None,
                "error": False,
                "_started": time.perf_counter(),
            }
            recent = [(s["tool"], s["input"]) for s in self.steps[-(REPEAT_LIMIT - 1) :]]
            if len(recent) == REPEAT_LIMIT - 1 and all(item == (step["tool"], step["input"]) for item in recent):
                self.stop_reason = "loop"
                self.stop_message = (
                    f"stopped as a loop: the agent asked for the same call, {_call_text(step)}, {REPEAT_LIMIT} "
                    "times in a row without a final answer (the last one was not run); a higher max_steps would "
                    "not help: show the model how to use what the tool returns (worked examples in messages, a "
                    "clearer system_prompt) or use a larger model"
                )
                return True
            self.steps.append(step)
            self.by_call[call["id"] or ""] = step
            self.ctx.progress(len(self.steps), self.max_steps, f"step {len(self.steps)}: {call['name']}")
        return False

    def stop_at_limit(self) -> None:
        """The agent wants more tool calls than ``max_steps`` allows."""
        self.stop_reason = "max_steps"
        self.stop_message = (
            f"stopped at max_steps={self.max_steps}: the agent made {len(self.steps)} tool call(s) and asked for "
            "more without giving a final answer; raise hyperparameters.max_steps, or show the model when to "
            "answer (worked examples in messages, a clearer system_prompt)"
        )

    def stop_at_graph_limit(self, limit: int) -> None:
        """LangGraph's recursion limit came before ``max_steps``: it counts model and tool turns alike."""
        self.stop_reason = "max_steps"
        self.stop_message = (
            f"stopped at LangGraph's recursion limit ({limit} model and tool turns, 2 x max_steps + 10) after "
            f"{len(self.steps)} tool call(s), without a final answer; raise hyperparameters.max_steps (now "
            f"{self.max_steps})"
        )

    def failure(self) -> str:
        """The reason of a task whose agent ended without an answer, with where its steps are."""
        where = f"; its {len(self.steps)} step(s) are in `mloc logs {self.ctx.task_id}`" if self.steps else ""
        return self.stop_message + where

    def count_usage(self) -> None:
        """Add the run's tokens and tool calls to the task's usage, which counts whether or not it answered."""
        for step in self.steps:
            step.pop("_started", None)
        self.ctx.add_usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            tool_calls=len(self.steps),
        )

    def result(self, model: Any, started: float) -> dict[str, Any]:
        engine = getattr(model, "engine", None)
        return {
            "ok": True,
            "model": engine.model_id if engine is not None else getattr(model, "_llm_type", type(model).__name__),
            "final_answer": self.final,
            "stop_reason": self.stop_reason,
            "stop_message": self.stop_message,
            "steps": self.steps,
            "items": [{"index": 0, "output": self.final, "finish_reason": self.stop_reason}],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "latency_sec": round(time.perf_counter() - started, 3),
                "num_requests": self.model_calls,
                "tool_calls": len(self.steps),
            },
        }


def _brief(text: str) -> str:
    """``text`` on one line, cut to :data:`LOGGED_CHARS`."""
    flat = " ".join(text.split())
    return flat if len(flat) <= LOGGED_CHARS else flat[: LOGGED_CHARS - 3] + "..."


def _call_text(step: dict[str, Any]) -> str:
    """'python_repl('print(1)')': a tool call as its log line and a loop's reason name it."""
    given = step["input"]
    if isinstance(given, str):
        shown = given if len(given) <= LOGGED_CHARS else given[: LOGGED_CHARS - 3] + "..."
        return f"{step['tool']}({shown!r})"
    return f"{step['tool']}({_brief(json.dumps(given, ensure_ascii=False))})"


def _step_line(step: dict[str, Any]) -> str:
    """'python_repl('print(6 * 7)') -> 42', or '... failed: ZeroDivisionError ...' for a tool error."""
    said = _brief(str(step["output"]))
    return f"{_call_text(step)} {'failed:' if step['error'] else '->'} {said}"
