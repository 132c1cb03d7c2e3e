""".dockerignore as Docker reads it: which repository paths reach a build context.

Docker's rules (moby/patternmatcher): blank lines and `#` lines are skipped; each pattern is cleaned
like a path (`!src/` is `src`, a leading `/` goes); `*` and `?` stop at `/`, `**` spans folders; a
pattern that matches a folder matches everything under it; `!` lets back in what an earlier pattern
left out, and the last pattern that matches a path decides. So an allow-list (`*`, then `!file` and
`!dir/`) keeps out every top-level entry it does not name again.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

Rules = list[tuple[bool, re.Pattern[str]]]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if pattern.startswith("/", i):
                out[-1] = "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            out.append(pattern[i : end + 1] if end > i else re.escape(pattern[i]))
            i = end + 1 if end > i else i + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules(text: str) -> Rules:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        # As Docker cleans it: `!dir/` and `./dir` name `dir`.
        pattern = posixpath.normpath(pattern).lstrip("/") or "."
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def rules_of(repo: Path) -> Rules:
    """The rules of ``repo``'s .dockerignore; none (everything is in the context) without one."""
    ignore_file = repo / ".dockerignore"
    return dockerignore_rules(ignore_file.read_text()) if ignore_file.exists() else []


def in_context(path: str, rules: Rules) -> bool:
    """Whether a repository path reaches the build context (Docker's rule: the last match wins;
    a pattern that matches a parent folder matches everything under it)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            included = negate
    return included
