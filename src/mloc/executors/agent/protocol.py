"""The text tool-call protocol: how a model without native tool calling asks for a tool.

Small local models rarely emit structured tool calls, so the agent prompt teaches them the classic
ReAct format and their reply is parsed here::

    Thought: I need to compute this.
    Action: python_repl
    Action Input: print(17 * 23)

The tool's result is fed back as ``Observation: ...`` and the model ends with ``Final Answer: ...``.
Models trained for tool use often write a JSON call instead (``<tool_call>{"name": ..., "arguments":
...}</tool_call>``, or a bare JSON object with ``name`` and ``arguments``); that is understood too.
Pure functions, no LangChain: the chat-model adapter builds on them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OBSERVATION = "Observation:"
STOPS = ("\nObservation:", "Observation:")

INSTRUCTIONS = """You can use these tools:
{tools}

To use a tool, reply in exactly this format and then stop:
Thought: what you will do next and why
Action: one of [{names}]
Action Input: the input for the tool

The result comes back as "Observation: ...". Repeat as needed. When you know the answer, reply:
Thought: I know the answer
Final Answer: the answer to the user"""

_ACTION = re.compile(
    r"Action\s*\d*\s*:\s*(?P<name>[^\n]+?)\s*\n+\s*Action\s*\d*\s*Input\s*\d*\s*:(?P<input>.*)", re.S | re.I
)
_FINAL = re.compile(r"Final\s*Answer\s*:(?P<answer>.*)", re.S | re.I)
_THOUGHT = re.compile(r"^\s*Thought\s*:\s*", re.I)
_TAGGED = re.compile(r"<tool_call>\s*(?P<body>\{.*?\})\s*</tool_call>", re.S)
_FENCE = re.compile(r"^```[\w+-]*\s*\n?(?P<body>.*?)\n?```\s*$", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """A parsed model reply: a thought, and either tool calls or a final answer."""

    thought: str
    calls: tuple[ToolCall, ...] = ()
    final: str | None = None


def describe_tools(tools: Sequence[Mapping[str, str]]) -> str:
    """The instructions block for ``tools`` (each a mapping with ``name`` and ``description``)."""
    lines = "\n".join(f"- {tool['name']}: {tool['description']}" for tool in tools)
    names = ", ".join(tool["name"] for tool in tools)
    return INSTRUCTIONS.format(tools=lines, names=names)


def parse_reply(text: str, parameters: Mapping[str, str]) -> Reply:
    """Parse a completion. ``parameters`` maps each tool name to its single input parameter, so the
    text after ``Action Input:`` becomes that parameter's value."""
    calls = _json_calls(text, parameters)
    if calls:
        thought = _TAGGED.split(text, maxsplit=1)[0] if "<tool_call>" in text else ""
        return Reply(_clean_thought(thought), calls)
    action = _ACTION.search(text)
    final = _FINAL.search(text)
    if action and (final is None or action.start() < final.start()):
        name = action.group("name").strip().strip("`'\"[]")
        raw = action.group("input").split(OBSERVATION, 1)[0]
        return Reply(_clean_thought(text[: action.start()]), (ToolCall(name, _arguments(name, raw, parameters)),))
    if final:
        return Reply(_clean_thought(text[: final.start()]), final=final.group("answer").strip())
    # A reply in neither format is the model answering directly.
    return Reply("", final=_THOUGHT.sub("", text.strip(), count=1).strip())


def _clean_thought(text: str) -> str:
    return _THOUGHT.sub("", text.strip(), count=1).strip()


def _strip_input(raw: str) -> str:
    value = raw.strip()
    fenced = _FENCE.match(value)
    if fenced:
        return fenced.group("body").strip("\n")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
        return value[1:-1]
    return value


def _arguments(name: str, raw: str, parameters: Mapping[str, str]) -> dict[str, Any]:
    value = _strip_input(raw)
    parameter = parameters.get(name, "input")
    if value.startswith("{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and parameter in decoded:
            return decoded
    return {parameter: value}


def _json_calls(text: str, parameters: Mapping[str, str]) -> tuple[ToolCall, ...]:
    bodies = [match.group("body") for match in _TAGGED.finditer(text)]
    stripped = _strip_input(text)
    if not bodies and stripped.startswith("{") and stripped.endswith("}"):
        bodies = [stripped]
    calls = []
    for body in bodies:
        try:
            decoded = json.loads(body)
        except ValueError:
            continue
        if not isinstance(decoded, dict) or not isinstance(decoded.get("name"), str):
            continue
        name = decoded["name"]
        arguments = decoded.get("arguments", decoded.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _arguments(name, arguments, parameters)
        if isinstance(arguments, dict):
            calls.append(ToolCall(name, arguments))
    return tuple(calls)


def render_step(thought: str, name: str, arguments: Mapping[str, Any], parameter: str, observation: str) -> str:
    """One finished step as the model would have written it, with its observation."""
    value = arguments.get(parameter) if set(arguments) == {parameter} else json.dumps(dict(arguments))
    lines = [f"Thought: {thought or 'I will use a tool.'}", f"Action: {name}", f"Action Input: {value}"]
    return "\n".join(lines) + f"\n{OBSERVATION} {observation.strip()}\n"
