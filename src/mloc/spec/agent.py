"""``agent_inference``: a ReAct agent with tools."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict, check_name, unfold_from
from mloc.spec.sampling import Message, Sampling

KNOWN_TOOLS = ("python_repl", "web_search", "retriever")
ToolName = Literal["python_repl", "web_search", "retriever"]
DEFAULT_AGENT_PROMPT = "You are a helpful assistant. Use a tool when it helps; answer briefly and exactly."


class AgentOptions(Strict):
    agent_type: Literal["react"] = "react"
    tools: list[ToolName] = Field(default_factory=list, description="Tools the agent may call.")
    max_steps: int = Field(8, ge=1, le=100, description="Tool calls before the agent is stopped.")
    system_prompt: str = DEFAULT_AGENT_PROMPT
    tool_timeout_sec: float = Field(10.0, gt=0, le=600, description="Wall-clock limit of one tool call.")
    python_memory_mb: int = Field(512, ge=64, le=65_536, description="Address-space limit of python_repl.")
    retriever_collection: str | None = Field(
        None, description="A collection a rag_inference task indexed (hyperparameters.collection)."
    )
    retriever_collection_from: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Written 'retriever_collection: {from: <task>}': a rag_inference task (a name in the same "
        "submission, or an id) whose named collection the retriever searches, in its vector_db; this task waits "
        "for it and runs on a worker that can read that collection.",
    )
    retriever_vector_db: Literal["chromadb", "faiss"] = "chromadb"
    retrieval_k: int = Field(4, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _collection_reference(cls, data: Any) -> Any:
        return unfold_from(data, "retriever_collection", "to search")

    @field_validator("tools")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("retriever_collection")
    @classmethod
    def _collection(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "retriever_collection")

    @model_validator(mode="after")
    def _retriever(self) -> AgentOptions:
        if self.retriever_collection is not None and self.retriever_collection_from is not None:
            raise ValueError("hyperparameters has retriever_collection and retriever_collection_from; keep one")
        named = self.retriever_collection is not None or self.retriever_collection_from is not None
        if "retriever" in self.tools and not named:
            raise ValueError(
                "the retriever tool needs retriever_collection: the name of a collection a rag_inference task "
                "indexed, or {from: <that task>}"
            )
        return self


class AgentSpec(SpecBase):
    kind: ClassVar[str] = "AgentTask"
    task_type: Literal["agent_inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = None
    hyperparameters: AgentOptions = Field(default_factory=AgentOptions)
    input: str | None = Field(None, description="A single question (appended after 'messages' if both are given).")
    messages: list[Message] = Field(default_factory=list, description="A multi-turn conversation.")
    inference: Sampling = Field(default_factory=Sampling)

    @model_validator(mode="after")
    def _has_input(self) -> AgentSpec:
        if not self.input and not self.messages:
            raise ValueError("no input; give 'input' (a question) or 'messages' (a conversation)")
        for index, message in enumerate(self.messages):
            if message.role == "tool":
                raise ValueError(
                    f"messages[{index}] has role 'tool'; an agent's conversation holds system, user and "
                    "assistant turns (the agent makes its own tool calls)"
                )
        if not self.input and self.messages[-1].role != "user":
            raise ValueError("the last message must be from the user: it is what the agent answers")
        return self
