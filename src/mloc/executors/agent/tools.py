"""The agent's tools as LangChain tools. A tool that fails answers the agent with the error (status
"error" in the trace) instead of ending the run, so the model can correct itself."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool, ToolException

from mloc.executors.agent.sandbox import PythonSandbox, SandboxResult

MAX_OBSERVATION_CHARS = 4000


def _guarded(function: Callable[..., str]) -> Callable[..., str]:
    """Turn any exception into a ToolException, which the tool reports to the agent as its result."""

    @functools.wraps(function)
    def call(*args: str, **kwargs: str) -> str:
        try:
            text = function(*args, **kwargs)
        except ToolException:
            raise
        except Exception as exc:
            raise ToolException(f"{type(exc).__name__}: {exc}") from exc
        return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + "\n[output cut]"

    return call


def _make(function: Callable[..., str], name: str, description: str) -> BaseTool:
    tool = StructuredTool.from_function(_guarded(function), name=name, description=description)
    tool.handle_tool_error = True
    return tool


def python_tool(sandbox: Callable[[], PythonSandbox]) -> BaseTool:
    def python_repl(code: str) -> str:
        result: SandboxResult = sandbox().run(code)
        text = result.output.rstrip() or "(no output; print() what you want to see)"
        if result.notes:
            text += "\n[" + "; ".join(result.notes) + "]"
        if not result.ok:
            raise ToolException(text)
        return text

    return _make(
        python_repl,
        "python_repl",
        "Runs Python code in a fresh, offline sandbox and returns what it prints (a final expression's "
        "value is printed too). Variables do not survive between calls; files in the working folder do.",
    )


def web_search_tool(k: int = 5) -> BaseTool:
    from mloc.executors.agent.search import SearchError, configured_provider, format_results

    def web_search(query: str) -> str:
        try:
            return format_results(configured_provider().search(query, k))
        except SearchError as exc:
            raise ToolException(str(exc)) from exc

    return _make(web_search, "web_search", "Searches the web and returns titles, links and snippets.")


def retriever_tool(search: Callable[[str], list[dict[str, Any]]], collection: str) -> BaseTool:
    def retriever(query: str) -> str:
        hits = search(query)
        if not hits:
            return "no matching passages"
        return "\n\n".join(
            f"[{n}] ({hit['source']}, score {hit['score']})\n{hit['text']}" for n, hit in enumerate(hits, 1)
        )

    return _make(
        retriever,
        "retriever",
        f"Searches the document collection {collection!r} and returns the most relevant passages.",
    )
