"""Sorting an executor process's output into log entries: library noise, or lines MLOC cannot place.

The executor process's own loggers reach the task's log as structured events (see
:mod:`mloc.worker.host`); what is left on its stdout and stderr is mostly libraries writing for
themselves: vLLM's and its engine processes' log lines, torch and absl warnings, transformers
messages, tqdm bars. :class:`Lines` turns that byte stream into entries with a level and a source:
``library`` where a line has a library's shape, else the stream's name (``stdout`` / ``stderr``).

A progress bar redraws itself with carriage returns; a terminal shows only its last state, so only
that is kept: one line when the bar finishes, and one every :data:`PROGRESS_EVERY_SEC` while it runs.
"""

from __future__ import annotations

import codecs
import re
import time
from dataclasses import dataclass

from mloc.tasklog import Source

# How often a running progress bar's state is written to the log, at most.
PROGRESS_EVERY_SEC = 10.0
# The line the executor process writes on both streams after each task: what came before is that task's.
END_OF_TASK = "\x1emloc: end of task\x1e"
_LEVEL_WORDS = "DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL"
# vLLM (and its engine processes, which prefix their name): "INFO 05-09 07:35:25 [config.py:12] ..."
_VLLM = re.compile(rf"^(?:\(\S+(?: pid=\d+)?\)\s+)?({_LEVEL_WORDS})\s+\d\d-\d\d \d\d:\d\d:\d\d")
# Python's logging.basicConfig default: "WARNING:root:...", and "2026-05-09 07:35:25,123 - name - INFO - ..."
_PY_DEFAULT = re.compile(rf"^({_LEVEL_WORDS}):[\w.]*:")
_PY_ASCTIME = re.compile(rf"^\d{{4}}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\W+(?:[\w.]+\W+)?({_LEVEL_WORDS})\b")
# glog / absl / torch's C++ side: "W0509 07:35:25.123 ...", "[W509 07:35:25 ...]"
_GLOG = re.compile(r"^\[?([IWEF])\d{3,4} \d\d:\d\d:\d\d")
_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
# warnings.warn: "/path/module.py:12: UserWarning: ..."
_PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")
_PROGRESS = re.compile(r"\d%\||\|\s*\d+/\d+ \[|\d(?:it|s|B)/s\]|s/it\]")
_LIBRARY_NAMES = re.compile(
    r"^\[?(?:vllm|torch|transformers|trl|peft|accelerate|datasets|huggingface_hub|tokenizers|safetensors|"
    r"sentence_transformers|langchain\w*|chromadb|faiss|bitsandbytes|triton|xformers|flash_attn|numexpr|"
    r"gguf|llama_cpp|ray)\b",
    re.IGNORECASE,
)
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception|Interrupt|Exit|Warning)\b")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LINE_END = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True)
class Captured:
    text: str
    level: str
    source: str


class Lines:
    """One output stream of an executor process (``stdout`` or ``stderr``), bytes in, entries out."""

    def __init__(self, stream: str) -> None:
        self.stream = Source(stream)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        self._bar: str | None = None  # the newest state of a progress bar not yet written
        self._bar_written_at: float | None = None  # when the running bar last reached the log (or began)
        self._previous: Captured | None = None
        self._in_traceback = False
        self.tasks_ended = 0  # END_OF_TASK lines seen

    def feed(self, data: bytes, now: float | None = None) -> list[Captured]:
        """The entries that ``data`` completes; ``b""`` means the stream ended."""
        now = time.monotonic() if now is None else now
        text = self._partial + self._decoder.decode(data, final=not data)
        out: list[Captured] = []
        position = 0
        for match in _LINE_END.finditer(text):
            if match.group() == "\r" and match.end() == len(text) and data:
                break  # a CR at the end of what arrived may be the start of a CRLF
            segment = text[position : match.start()]
            position = match.end()
            if match.group() == "\r":
                self._redraw(segment, now, out)
            else:
                self._line(segment, out)
        self._partial = text[position:]
        if not data:
            if self._partial:
                self._line(self._partial, out)
                self._partial = ""
            elif self._bar is not None:
                out.append(self._sorted(self._bar))
                self._bar = None
        return out

    def _redraw(self, segment: str, now: float, out: list[Captured]) -> None:
        if not segment.strip():
            return
        self._bar = segment
        if self._bar_written_at is None:
            self._bar_written_at = now
        elif now - self._bar_written_at >= PROGRESS_EVERY_SEC:
            self._bar_written_at = now
            out.append(self._sorted(segment))
            self._bar = None

    def _line(self, segment: str, out: list[Captured]) -> None:
        if not segment.strip():
            # The newline that ends a redrawn bar: its last state is the line.
            if self._bar is not None:
                out.append(self._sorted(self._bar))
            self._bar = self._bar_written_at = None
            return
        self._bar = self._bar_written_at = None
        if segment == END_OF_TASK:
            self.tasks_ended += 1
            return
        out.append(self._sorted(segment))

    def _sorted(self, raw: str) -> Captured:
        text = _ANSI.sub("", raw).rstrip()
        captured = self._classify(text)
        self._previous = captured
        return captured

    def _classify(self, text: str) -> Captured:
        stripped = text.lstrip()
        if self._in_traceback:
            if _EXCEPTION_LINE.match(text):
                self._in_traceback = False
                return Captured(text, "ERROR", self.stream.value)
            if text[:1].isspace():
                return Captured(text, "ERROR", self.stream.value)
            self._in_traceback = False
        if text.startswith(_TRACEBACK):
            self._in_traceback = True
            return Captured(text, "ERROR", self.stream.value)
        if match := _VLLM.match(text) or _PY_DEFAULT.match(text) or _PY_ASCTIME.match(text):
            return Captured(text, _level(match.group(1)), Source.LIBRARY.value)
        if match := _GLOG.match(text):
            return Captured(text, _GLOG_LEVELS[match.group(1)], Source.LIBRARY.value)
        if _PY_WARNING.match(text):
            return Captured(text, "WARNING", Source.LIBRARY.value)
        if _PROGRESS.search(text) or _LIBRARY_NAMES.match(stripped) or "site-packages/" in text:
            return Captured(text, "INFO", Source.LIBRARY.value)
        previous = self._previous
        if previous is not None and text[:1].isspace() and previous.source == Source.LIBRARY:
            # The indented rest of a library's message (a warning's source line, a wrapped record).
            return Captured(text, previous.level, previous.source)
        return Captured(text, "INFO", self.stream.value)


def _level(word: str) -> str:
    upper = word.upper()
    return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(upper, upper)
