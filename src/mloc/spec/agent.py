"""``agent_inference``: a ReAct agent with tools."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict
from mloc.spec.sampling import Message, Sampling

KNOWN_TOOLS = ("python_repl", "web_search", "retriever")


class AgentOptions(Strict):
    agent_type: Literal["react"] = "react"
    tools: list[Literal["python_repl", "web_search", "retriever"]] = Field(default_factory=list)
    max_steps: int = Field(8, ge=1, le=100)
    retriever_collection: str | None = None
    tool_timeout_sec: float = Field(10.0, gt=0, le=600)


class AgentSpec(SpecBase):
    kind: ClassVar[str] = "AgentTask"
    task_type: Literal["agent_inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = None
    hyperparameters: AgentOptions = Field(default_factory=AgentOptions)
    input: str | None = Field(None, description="A single question.")
    messages: list[Message] = Field(default_factory=list, description="A multi-turn conversation.")
    inference: Sampling = Field(default_factory=Sampling)

    @model_validator(mode="after")
    def _has_input(self) -> AgentSpec:
        if not self.input and not self.messages:
            raise ValueError("no input: give 'input' (a question) or 'messages' (a conversation)")
        return self
