"""How a task's result is printed: each item's prompt or question, its output and, for a RAG answer,
the sources it was given; at most a few of them, then how many more there are. A result without
items is printed as JSON, cut short likewise."""

from __future__ import annotations

from typing import Any

from mloc.cli import output


def print_result(record: dict[str, Any], result: Any, shown: int) -> None:
    """At most ``shown`` of the result's items (a RAG result's answers), or its first lines as JSON."""
    items = result.get("items") if isinstance(result, dict) else None
    if not (isinstance(items, list) and items) and isinstance(result, dict):
        items = result.get("answers")  # a RAG result's answers say the same as its items, and more
    if isinstance(items, list) and items:
        _items(record, items, shown)
    else:
        _value(result, shown)


def _items(record: dict[str, Any], items: list[Any], shown: int) -> None:
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
        elif isinstance(index, int) and 0 <= index < len(prompts):
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
    lines = output.json_text(result).splitlines()
    limit = max(shown, 1) * 4
    for row in lines[:limit]:
        output.line(row)
    if len(lines) > limit:
        output.line(f"... {len(lines) - limit} more lines not shown")
