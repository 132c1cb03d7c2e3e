"""How a task's result is printed: each item's prompt or question, its output and, for a RAG answer,
the sources it was given; at most a few of them, then how many more there are. An agent's result is its
question, its first few tool calls and its answer. A dataset task's
result is its result lines (results.jsonl), printed alike; its responses.json holds only the totals.
Any other result without items is printed as JSON, cut short likewise."""

from __future__ import annotations

from typing import Any

from mloc.cli import output

AGENT_TASK_TYPE = "agent_inference"


def print_result(record: dict[str, Any], result: Any, shown: int) -> None:
    """At most ``shown`` of the result's items (a RAG result's answers), or its first lines as JSON; an
    agent's question, at most ``shown`` of its tool calls, and its answer."""
    if isinstance(result, dict) and is_agent(record):
        agent_answer(record, result, shown)
        return
    items = result.get("items") if isinstance(result, dict) else None
    if not (isinstance(items, list) and items) and isinstance(result, dict):
        items = result.get("answers")  # a RAG result's answers say the same as its items, and more
    if isinstance(items, list) and items:
        _items(record, items, shown)
    else:
        _value(result, shown)
    if isinstance(result, dict) and result.get("stop_message") and result.get("final_answer") is None:
        # An agent that stopped without an answer: its item is empty, and the why is here.
        steps = result.get("steps")
        taken = f" after {len(steps)} step(s) (`mloc result {record.get('task_id', 'ID')}` shows them)" if steps else ""
        output.line(output.visible(f"no answer: {result['stop_message']}{taken}", one_line=True))


def has_lines(result: Any) -> bool:
    """Whether the result is a dataset task's totals, its items being result lines (results.jsonl)."""
    return isinstance(result, dict) and bool(result.get("results_file"))


def print_lines(result: dict[str, Any], lines: list[dict[str, Any]], shown: int, rest: str) -> None:
    """A dataset task's first result lines (at most ``shown``), where the rest are (``rest``: a command
    or a file; a command is given the offset to go on from), then its totals in one line."""
    for item in lines[:shown]:
        print_line(item)
    rows = result.get("rows")
    count = len(lines[:shown])
    go_on = f"{rest} --offset {count}" if rest.startswith("mloc ") and count else rest
    if isinstance(rows, int) and not isinstance(rows, bool):
        if rows > count:
            output.line(f"... {rows - count} more of {rows} result lines: {go_on}")
    elif count == shown:
        output.line(f"... more result lines may follow: {go_on}")
    output.line(output.visible(_totals(result), one_line=True))


def _totals(result: dict[str, Any]) -> str:
    """'rows 25: 24 succeeded, 1 failed (from dataset questions.jsonl, 3 chunk(s))'."""
    parts = [f"{result[k]} {k}" for k in ("succeeded", "failed") if result.get(k) is not None]
    text = f"rows {result.get('rows', '?')}" + (": " + ", ".join(parts) if parts else "")
    where = [f"from {result['input']}"] if result.get("input") else []
    if result.get("chunks"):
        where.append(f"{result['chunks']} chunk(s)")
    if result.get("more"):
        where.append("more rows past these")
    return text + (f" ({', '.join(where)})" if where else "")


def print_line(line: dict[str, Any]) -> None:
    """One result line: its id, how it ended and its tokens, then its output (or error)."""
    head = f"--- {line.get('id')}"
    if line.get("error") is not None:
        output.line(output.styled(output.visible(head + " (error)", one_line=True), "bold"))
        output.line(output.styled(output.visible(str(line["error"])), "red"))
        return
    finish = line.get("finish_reason")
    reasons = ", ".join(map(str, finish)) if isinstance(finish, list) else finish
    tokens = f"{line.get('prompt_tokens', 0)}+{line.get('completion_tokens', 0)} tokens"
    output.line(output.styled(output.visible(f"{head} ({reasons}, {tokens})", one_line=True), "bold"))
    outputs = line.get("output")
    for text in outputs if isinstance(outputs, list) else [outputs]:
        output.line(output.visible(str(text)))


def is_agent(record: dict[str, Any]) -> bool:
    """Whether the record is an agent task's (the API's record names its type; a document, its taskType)."""
    spec = record.get("spec")
    inner = spec.get("spec") if isinstance(spec, dict) else None
    declared = inner.get("taskType") if isinstance(inner, dict) else None
    return AGENT_TASK_TYPE in (record.get("task_type"), declared)


def agent_answer(record: dict[str, Any], result: dict[str, Any], shown: int) -> None:
    """An agent's question, at most ``shown`` of its tool calls (tool, input, output cut to a line), then
    its final answer; nothing with ``shown`` 0. `mloc show` and `--wait` both print it so."""
    if not shown:
        return
    spec = record.get("spec") or {}
    inner = spec.get("spec") if isinstance(spec, dict) else None
    if isinstance(inner, dict):
        # `input` is the question when given (it follows `messages`), else the conversation's last user turn.
        users = [m for m in inner.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        asked = inner.get("input") or (users[-1].get("content") if users else None)
        if asked:
            _asked("question:", asked)
    steps = [step for step in result.get("steps") or [] if isinstance(step, dict)]
    output.line(output.styled(f"steps ({len(steps)}):" if steps else "steps: none, it answered without a tool", "dim"))
    for number, step in enumerate(steps[:shown], start=1):
        given = step.get("input")
        argument = repr(given) if isinstance(given, str) else output.json_text(given, indent=None)
        said = output.visible(step.get("output"), one_line=True)
        arrow = "failed:" if step.get("error") else "->"
        line = f"  {step.get('step', number)}. {step.get('tool', '?')}({output.shorten(argument, 120)}) {arrow} "
        output.line(output.styled(output.visible(line, one_line=True) + output.shorten(said, 160), "dim"))
    if len(steps) > shown:
        output.line(f"  ... {len(steps) - shown} more of {len(steps)} steps: mloc result {record.get('task_id', 'ID')}")
    if result.get("final_answer"):
        output.line(output.styled("answer:", "dim"))
        output.line(output.visible(result["final_answer"]))
    else:
        # Agents that stopped without an answer succeeded before such runs failed: say so plainly.
        why = result.get("stop_message") or "the agent ended without one"
        output.line(output.visible(f"no answer: {why}", one_line=True))


def _items(record: dict[str, Any], items: list[Any], shown: int) -> None:
    """Each item with what it was asked: its question (a RAG answer) or the prompt at its index."""
    spec = (record.get("spec") or {}).get("spec", {}) if isinstance(record.get("spec"), dict) else {}
    prompts = (spec.get("inference") or {}).get("prompts") or []
    for item in items[:shown]:
        if not isinstance(item, dict):
            output.line(output.json_text(item, indent=None))
            continue
        index = item.get("index", 0)
        finish = f" ({item['finish_reason']})" if item.get("finish_reason") else ""
        output.line(output.styled(output.visible(f"--- #{index}{finish}", one_line=True), "bold"))
        if item.get("question") is not None:
            _asked("question:", item["question"])
        elif isinstance(index, int) and 0 <= index < len(prompts) and prompts[index]:
            _asked("prompt:", prompts[index])
        output.line(output.visible(item.get("output", item.get("answer", ""))))
        sources = item.get("sources")
        if isinstance(sources, list) and sources:
            _sources(sources)
    if len(items) > shown:
        output.line(f"... {len(items) - shown} more of {len(items)} results not shown")


def _asked(label: str, text: Any) -> None:
    said = text if isinstance(text, str) else output.json_text(text, indent=None)
    output.line(output.styled(label, "dim"), output.styled(output.visible(said), "dim"))


def _sources(sources: list[Any]) -> None:
    """'sources:' then one line each, best first: '  1. handbook/coffee.md (chunk 1, score 0.712): excerpt'."""
    output.line(output.styled("sources:", "dim"))
    for number, source in enumerate(sources, start=1):
        if not isinstance(source, dict):
            output.line("  " + output.json_text(source, indent=None))
            continue
        where = []
        if source.get("chunk") is not None:
            where.append(f"chunk {source['chunk']}")
        score = source.get("score")
        if isinstance(score, int | float):
            where.append(f"score {score:.3f}")
        head = f"  {source.get('rank', number)}. {source.get('source', '?')}"
        if where:
            head += f" ({', '.join(where)})"
        excerpt = source.get("excerpt")
        if not excerpt:
            output.line(output.visible(head, one_line=True))
            continue
        output.line(
            output.visible(head + ":", one_line=True),
            output.styled(output.visible(output.shorten(str(excerpt), 160), one_line=True), "dim"),
        )


def _value(result: Any, shown: int) -> None:
    if not shown:
        return  # --show 0: none of it; where the whole result is follows
    lines = output.json_text(result).splitlines()
    limit = shown * 4
    for row in lines[:limit]:
        output.line(row)
    if len(lines) > limit:
        output.line(f"... {len(lines) - limit} more lines not shown")
