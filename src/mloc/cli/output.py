"""How the CLI prints: data as literal text, tables that are not wrapped in pipes, JSON for scripts.

Everything a user, a model or a library wrote (prompts, outputs, reasons, log lines, names) is data:
it is never read as Rich markup or emoji codes, and control characters in it are shown as escapes
(``\\x1b``, ``\\r``) so a log line cannot move the cursor, clear the screen or recolour the terminal.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TextIO

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mloc.errors import MlocError

# C0 and C1 control characters, DEL, and the bidirectional overrides and isolates that reorder what a
# terminal shows ("Trojan Source"). Line feeds and tabs stay in multi-line text.
_MULTILINE_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ONE_LINE_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters json.dumps(ensure_ascii=False) leaves raw although a terminal acts on them.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Piped output is never wrapped; Rich needs some width, and a table is only as wide as its cells.
PIPE_WIDTH = 1_000_000


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(value: object, *, one_line: bool = False) -> str:
    """``value`` as text with every control character shown as an escape; ``one_line`` also escapes
    line breaks and tabs (table cells, names)."""
    text = "" if value is None else str(value)
    if one_line:
        return _ONE_LINE_UNSAFE.sub(_escape, text)
    return _MULTILINE_UNSAFE.sub(_escape, text.replace("\r\n", "\n"))


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ consoles
_consoles: dict[tuple[int, bool], Console] = {}


def no_color() -> bool:
    """Whether NO_COLOR asks for output without colour (no-color.org: set and not empty)."""
    return os.environ.get("NO_COLOR", "") != ""


def _console_for(stream: TextIO) -> Console:
    terminal = stream.isatty()
    # NO_COLOR and pipes get no escape at all, neither styles nor the cursor moves of a live status line
    # (`--wait` prints a line per change instead): Rich alone drops only the colours under NO_COLOR and
    # keeps bold and dim, and FORCE_COLOR or TTY_COMPATIBLE would make it style a pipe.
    plain = no_color() or not terminal
    key = (id(stream), plain)
    console = _consoles.get(key)
    if console is None or console.file is not stream:
        console = Console(
            file=stream,
            markup=False,
            emoji=False,
            highlight=False,
            soft_wrap=not terminal,
            width=None if terminal else PIPE_WIDTH,
            force_terminal=False if plain else None,
            color_system=None if plain else "auto",
        )
        _consoles[key] = console
    return console


def plain_help() -> None:
    """Typer's help and usage errors without escapes under NO_COLOR or in a pipe, as everything else
    `mloc` prints: Typer builds its own consoles, which keep bold and dim under NO_COLOR and style a pipe
    under FORCE_COLOR or GITHUB_ACTIONS. One setting covers both of its streams, so a pipe on either
    makes both plain."""
    if no_color() or not (sys.stdout.isatty() and sys.stderr.isatty()):
        import typer.rich_utils

        typer.rich_utils.COLOR_SYSTEM = None


def out() -> Console:
    """The console on stdout (looked up each time, so a test runner's captured stdout is honoured)."""
    return _console_for(sys.stdout)


def err() -> Console:
    return _console_for(sys.stderr)


def is_terminal() -> bool:
    """Whether stdout takes a live status line: a terminal, and NO_COLOR not set."""
    return out().is_terminal


def line(*parts: str | Text, stderr: bool = False) -> None:
    """One line, its parts joined by spaces; str parts are printed literally. The terminal wraps it, not
    Rich: a long line copied from the screen stays one line."""
    text = Text()
    for index, part in enumerate(parts):
        if index:
            text.append(" ")
        text.append(part if isinstance(part, Text) else Text(part))
    (err() if stderr else out()).print(text, soft_wrap=True)


def styled(text: str, style: str) -> Text:
    """Literal text in a style (colour only: the text is never parsed)."""
    return Text(text, style=style)


def table(*columns: str, title: str | None = None, caption: str | None = None) -> Table:
    grid = Table(
        *columns,
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        title_justify="left",
        caption_justify="left",
    )
    return grid


def keep_whole(grid: Table, index: int, values: Iterable[str]) -> None:
    """Column ``index`` of ``grid`` is never wrapped or cut, however narrow the terminal: it holds ids
    that are copied into the next command. The other columns give way, long words folded rather than
    cut short. A table still wider than the terminal loses its right edge, so the ids go first."""
    for number, column in enumerate(grid.columns):
        if number != index and not column.no_wrap:
            column.overflow = "fold"
    column = grid.columns[index]
    column.no_wrap = True
    column.min_width = max((cell_len(value) for value in values), default=None)


def cell(value: object, limit: int | None = None) -> Text:
    text = visible(value, one_line=True)
    return Text(shorten(text, limit) if limit else text)


def show(renderable: Any) -> None:
    out().print(renderable)


# ----------------------------------------------------------------------- json
def json_text(data: Any, indent: int | None = 2) -> str:
    """``data`` as JSON whose strings hold no character a terminal acts on (they are \\u escapes);
    other non-ASCII text stays readable."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, for scripts (jq)."""
    sys.stdout.write(json_text(data) + "\n")
    sys.stdout.flush()


def json_line(data: Any) -> None:
    sys.stdout.write(json_text(data, indent=None) + "\n")
    sys.stdout.flush()


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts and jq); same as -o json.")]
OutputFormat = Annotated[Format | None, typer.Option("-o", "--output", help="table (default) or json.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print only the ids, one a line.")]


def wants_json(flag: bool, output: Format | None) -> bool:
    return flag or output is Format.JSON


# --------------------------------------------------------------------- errors
def error_line(message: str) -> None:
    """One plain line on stderr: no markup, emoji codes or wrapping that would change the text."""
    sys.stderr.write(f"error: {visible(message)}\n")
    sys.stderr.flush()


def with_fix(message: str, fix: str | None) -> str:
    """'message -> fix'; the message alone where it says the fix already (MLOC's own checks end with it)."""
    return f"{message} -> {fix}" if fix and fix not in message else message


def _detail(detail: Any) -> str:
    if isinstance(detail, dict):
        where = detail.get("path") or detail.get("index")
        text = with_fix(str(detail.get("message", detail)), detail.get("fix"))
        return f"{where}: {text}" if where not in (None, "") else text
    return str(detail)


def _said(detail: Any, summary: str) -> bool:
    """Whether ``summary`` already says everything ``detail`` does (its path, message and fix)."""
    if not isinstance(detail, dict):
        return str(detail) in summary
    parts = [str(detail[key]) for key in ("path", "message", "fix") if detail.get(key) not in (None, "")]
    return bool(parts) and all(part in summary for part in parts)


def fail(exc: MlocError, code: int = 2) -> NoReturn:
    """Print an error (and up to 20 of its details) and exit."""
    error_line(exc.message)
    details = exc.details[:20]
    # The orchestrator's summary of a single refusal is that refusal's own text; a bullet would only
    # repeat it. Several details stay listed: one a line reads better than the summary's joined run.
    if len(details) == 1 and _said(details[0], exc.message):
        details = []
    for detail in details:
        sys.stderr.write(f"  - {visible(_detail(detail))}\n")
    raise typer.Exit(code)


def die(message: str, code: int = 2) -> NoReturn:
    error_line(message)
    raise typer.Exit(code)


# ---------------------------------------------------------------------- times
def when(ts: float | None) -> str:
    """Local date and time with the zone's UTC offset ('2026-05-09 07:35:25+02:00'), or '-'. Every time
    `mloc` prints for people is this one: unambiguous wherever it is read, and what `mloc logs --since`
    takes back."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds") if ts else "-"


def duration(seconds: float | None) -> str:
    """'850 ms', '12.3 s', '4 min 05 s', '2 h 07 min', '3 d 4 h'."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def ago(ts: float | None, now: float | None = None) -> str:
    """'just now', '42 s ago', '3 min ago', '5 h ago', '2 days ago' (or 'in 3 min' for a future time)."""
    if not ts:
        return "-"
    delta = (time.time() if now is None else now) - ts
    future = delta < 0
    delta = abs(delta)
    if delta < 2:
        return "just now"
    if delta < 60:
        amount = f"{delta:.0f} s"
    elif delta < 3600:
        amount = f"{delta // 60:.0f} min"
    elif delta < 86400 * 2:
        amount = f"{delta // 3600:.0f} h"
    else:
        amount = f"{delta // 86400:.0f} days"
    return f"in {amount}" if future else f"{amount} ago"


def at(ts: float | None) -> str:
    """'2026-05-09 07:35:25 (3 min ago)'."""
    return f"{when(ts)} ({ago(ts)})" if ts else "-"


def amount(value: object, *, grouped: bool = False) -> str:
    """A count or measure as people read it: a whole number as the integer it is ('3', not '3.0' or
    '3e+06': Redis adds usage up as floats), any other number rounded ('3.18', '0.85', '0.05', '0.0012');
    ``grouped`` puts commas in large whole numbers. Anything else is shown as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return visible(value, one_line=True)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) or value.is_integer():
        return f"{int(value):,}" if grouped else str(int(value))
    if abs(value) >= 0.1:
        return f"{value:,.2f}" if grouped else f"{value:.2f}"
    # Below a tenth (a cost, a latency) two decimals would say 0.00: two significant digits instead.
    decimals = min(12, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}".rstrip("0")


def size(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
