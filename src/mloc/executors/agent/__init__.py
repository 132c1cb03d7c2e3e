"""``agent_inference``: a ReAct agent with a sandboxed Python tool, web search and RAG retrieval."""

from mloc.executors.agent.executor import AgentExecutor

__all__ = ["AgentExecutor"]
