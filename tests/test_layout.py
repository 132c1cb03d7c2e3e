"""The dependency rule between MLOC's rooms: the orchestrator and the worker never import each other,
and executors, engines and the shared core import neither. Read from the source, so a new import
that breaks the rule fails here rather than in a deployment that installs only one side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mloc"
ORCHESTRATOR = ("mloc.orchestrator", "mloc.api")
WORKER = ("mloc.worker",)
# The launchers start either side on purpose.
LAUNCHERS = {"mloc.cli", "mloc.localcluster"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, rooms: tuple[str, ...]) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def forbidden_for(module: str) -> tuple[str, ...]:
    if module in LAUNCHERS:
        return ()
    if within(module, ORCHESTRATOR):
        return WORKER
    if within(module, WORKER):
        return ORCHESTRATOR
    return ORCHESTRATOR + WORKER  # executors, llm, spec and the shared core


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_module_imports_follow_the_dependency_rule(path: Path) -> None:
    module = module_name(path)
    wrong = sorted(name for name in imported(path) if within(name, forbidden_for(module)))
    assert not wrong, f"{module} imports {wrong}, across the dependency rule (see docs/architecture.md)"


def test_the_rule_catches_a_worker_importing_the_orchestrator(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from mloc.orchestrator.scheduler import Scheduler\nimport mloc.api.app\n")
    assert sorted(n for n in imported(bad) if within(n, forbidden_for("mloc.worker.runner"))) == [
        "mloc.api.app",
        "mloc.orchestrator.scheduler",
        "mloc.orchestrator.scheduler.Scheduler",
    ]
