"""A LangChain chat model over an MLOC engine, speaking the text tool-call protocol.

LangChain's agent loop wants a chat model whose replies carry structured ``tool_calls``. MLOC's
engines produce text, so this adapter renders the conversation with the model's chat template (or
plain turns), appends the tool instructions and the agent's scratchpad in ReAct form, and turns the
reply back into an ``AIMessage`` with ``tool_calls`` (see :mod:`mloc.executors.agent.protocol`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field

from mloc.errors import TaskCancelled
from mloc.executors.agent import protocol
from mloc.llm.base import LLMEngine
from mloc.spec.sampling import Message, Sampling


def tool_parameter(tool: BaseTool) -> str:
    """The single input parameter a text-protocol tool call fills."""
    return next(iter(tool.args), "input")


class EngineChatModel(BaseChatModel):
    """Chat model whose tool calls are parsed from text the engine writes."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: LLMEngine
    sampling: Sampling
    tools: list[dict[str, str]] = Field(default_factory=list)
    # The task's cancel signal: an engine that can stop mid-generation does.
    cancel: threading.Event | None = None
    # Every prompt sent and reply received, for the trace and for tests.
    transcript: list[dict[str, str]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return f"mloc-{self.engine.name}"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        described = []
        for tool in tools:
            if not isinstance(tool, BaseTool):
                raise TypeError(f"{type(self).__name__} takes LangChain tools, got {tool!r}")
            described.append({"name": tool.name, "description": tool.description, "parameter": tool_parameter(tool)})
        # The transcript list is shared on purpose: the bound copy records into the caller's list.
        return self.model_copy(update={"tools": described, "transcript": self.transcript})

    def render(self, messages: Sequence[BaseMessage]) -> str:
        """The prompt: system + conversation through the last user turn, then this turn's steps."""
        last_user = max((i for i, message in enumerate(messages) if isinstance(message, HumanMessage)), default=-1)
        systems = [str(message.content) for message in messages if isinstance(message, SystemMessage)]
        if self.tools:
            systems.append(protocol.describe_tools(self.tools))
        turns: list[Message] = []
        if systems:
            turns.append(Message(role="system", content="\n\n".join(systems)))
        for message in messages[: last_user + 1]:
            if isinstance(message, HumanMessage):
                turns.append(Message(role="user", content=str(message.content)))
            elif isinstance(message, AIMessage) and message.content:
                turns.append(Message(role="assistant", content=str(message.content)))
        prompt = self.engine.render_chat(turns)
        if not self.tools:
            return prompt
        parameters = {tool["name"]: tool["parameter"] for tool in self.tools}
        outputs = {m.tool_call_id: str(m.content) for m in messages[last_user + 1 :] if isinstance(m, ToolMessage)}
        scratchpad = []
        for message in messages[last_user + 1 :]:
            if isinstance(message, AIMessage):
                for call in message.tool_calls:
                    parameter = parameters.get(call["name"], "input")
                    observation = outputs.get(call["id"] or "", "(no result)")
                    scratchpad.append(
                        protocol.render_step(str(message.content), call["name"], call["args"], parameter, observation)
                    )
        return prompt + "".join(scratchpad) + "Thought:"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from mloc.llm.text import PLAIN_TURN_STOPS

        prompt = self.render(messages)
        extra = [*(stop or []), *(protocol.STOPS if self.tools else ())]
        if not self.engine.has_chat_template:
            extra.extend(PLAIN_TURN_STOPS)
        stops = list(dict.fromkeys([*self.sampling.stop, *extra]))
        sampling = self.sampling.model_copy(update={"stop": stops, "n": 1})
        generations = self.engine.generate([prompt], sampling, cancel=self.cancel)
        if self.cancel is not None and self.cancel.is_set():
            # A cancelled engine stops mid-generation and answers with what it has, or nothing at all.
            raise TaskCancelled("the task was cancelled")
        generation = generations[0][0]
        self.transcript.append({"prompt": prompt, "reply": generation.output})
        usage = {
            "input_tokens": generation.prompt_tokens,
            "output_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }
        metadata = {"finish_reason": generation.finish_reason, "raw": generation.output}
        if not self.tools:
            message = AIMessage(content=generation.output.strip(), usage_metadata=usage, response_metadata=metadata)
            return ChatResult(generations=[ChatGeneration(message=message)])
        parameters = {tool["name"]: tool["parameter"] for tool in self.tools}
        reply = protocol.parse_reply("Thought:" + generation.output, parameters)
        if reply.calls:
            calls = [
                {
                    "name": call.name,
                    "args": call.arguments,
                    "id": f"call_{uuid.uuid4().hex[:12]}",
                    "type": "tool_call",
                }
                for call in reply.calls
            ]
            message = AIMessage(
                content=reply.thought, tool_calls=calls, usage_metadata=usage, response_metadata=metadata
            )
        else:
            message = AIMessage(content=reply.final or "", usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])
