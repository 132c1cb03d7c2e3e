"""The rules of a submission's graph that need no server: names, a task naming itself, names that name
no task, and cycles. The orchestrator plans with them (:mod:`mloc.orchestrator.pipelines`) and `mloc
validate` checks with them, so both refuse alike, in the same words."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

# A full task id, or its start as `mloc tasks` shows it (git-style short ids): an entry that may name a
# task stored earlier, which only the orchestrator can look up.
TASK_ID_OR_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{3,35}")


def duplicate_name(name: str) -> str:
    return f"two tasks are named {name!r}; give each a name of its own"


def names_itself(entry: str) -> str:
    return f"the task names itself ({entry!r}); name another task"


def names_nothing(entry: str, names: Sequence[str]) -> str:
    listed = ", ".join(sorted(names)) or "none named"
    close = difflib.get_close_matches(entry, names, n=1, cutoff=0.7)
    fix = f"did you mean {close[0]!r}?" if close else "name one of them"
    return f"{entry!r} is neither a task of this submission (metadata.name: {listed}) nor a task id of yours; {fix}"


def cycle_message(names: Sequence[str]) -> str:
    return f"the tasks wait for each other in a cycle: {' -> '.join(names)}; remove one of these dependencies"


def find_cycle(edges: Sequence[Sequence[int]]) -> list[int]:
    """The first cycle a depth-first walk in submission order meets (``edges[i]``: the tasks task ``i``
    waits for), its first task repeated at its end; [] when there is none."""
    state: dict[int, int] = {}  # 1: on the walk's path, 2: done

    def visit(node: int, path: list[int]) -> list[int]:
        state[node] = 1
        for other in edges[node]:
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if state.get(other) != 2:
                found = visit(other, [*path, other])
                if found:
                    return found
        state[node] = 2
        return []

    for node in range(len(edges)):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return []
