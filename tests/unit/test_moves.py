"""mloc.moves: every move the code makes is named there, and each one is one the table allows."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mloc import moves
from mloc.errors import InvalidTransition
from mloc.state import ALLOWED, TaskState
from mloc.store import TaskStore
from tests.conftest import free_port

SRC = Path(__file__).resolve().parents[2] / "src" / "mloc"


@pytest.mark.parametrize("move", moves.ALL, ids=[move.name for move in moves.ALL])
def test_every_named_move_is_one_the_table_allows(move: moves.Move) -> None:
    assert move.sources, move
    for source in move.sources:
        assert move.target in ALLOWED[source], f"{move.name}: {source} -> {move.target}"
    assert move.allowed
    move.check()


def test_move_names_are_unique_and_every_move_is_listed() -> None:
    names = [move.name for move in moves.ALL]
    assert len(names) == len(set(names))
    defined = {value for value in vars(moves).values() if isinstance(value, moves.Move)}
    assert defined == set(moves.ALL)


def test_every_edge_of_the_table_is_named_by_some_move() -> None:
    """An edge no move takes is dead weight in the table, or a move the code makes without a name."""
    edges = {(source, target) for source, targets in ALLOWED.items() for target in targets}
    named = {(source, move.target) for move in moves.ALL for source in move.sources}
    assert edges == named


def test_the_code_asks_only_for_named_moves() -> None:
    """Every ``moves.X`` the source uses is a listed move (or a helper of the module)."""
    helpers = {"Move", "Change", "Reservation", "finish", "ALL"}
    listed = {name for name, value in vars(moves).items() if isinstance(value, moves.Move)}
    used: set[tuple[str, str]] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "moves":
                used.add((node.attr, str(path.relative_to(SRC))))
    assert used, "no module uses mloc.moves"
    unknown = sorted((name, where) for name, where in used if name not in listed | helpers)
    assert unknown == []
    # And every listed move is made somewhere (an attempt's three endings through moves.finish).
    made = {name for name, _ in used}
    if "finish" in made:
        made |= {"SUCCEED", "FAIL", "CANCEL_RUNNING"}
    assert listed <= made


def test_a_forbidden_move_raises_before_redis_is_touched() -> None:
    # A client for a port nobody listens on: any command would fail with a connection error.
    store = TaskStore(aioredis.Redis(host="127.0.0.1", port=free_port()))
    forbidden = moves.Move("succeed_unstarted", TaskState.SUCCEEDED, frozenset({TaskState.PENDING}))
    assert forbidden.forbidden() == [TaskState.PENDING] and not forbidden.allowed
    with pytest.raises(InvalidTransition, match="pending -> succeeded"):
        asyncio.run(store.transition("any", forbidden))
    later = moves.Change(moves.Move("revive", TaskState.PENDING, frozenset({TaskState.SUCCEEDED})))
    with pytest.raises(InvalidTransition, match="succeeded -> pending"):
        asyncio.run(store.apply("any", moves.Change(moves.START), then=later))
    with pytest.raises(InvalidTransition, match="no source"):
        moves.Move("nowhere", TaskState.RUNNING, frozenset()).check()


def test_an_attempt_ends_in_one_of_three_moves() -> None:
    assert moves.finish(TaskState.SUCCEEDED) is moves.SUCCEED
    assert moves.finish(TaskState.FAILED) is moves.FAIL
    assert moves.finish(TaskState.CANCELLED) is moves.CANCEL_RUNNING
    with pytest.raises(InvalidTransition, match="not pending"):
        moves.finish(TaskState.PENDING)
