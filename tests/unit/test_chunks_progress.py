"""A dataset task's progress in words, as `mloc show` prints it: rows done, the failed ones among them,
and the chunks not finished."""

from __future__ import annotations

import pytest

from mloc.orchestrator.chunks import rows_message


@pytest.mark.parametrize(
    ("args", "unfinished", "expected"),
    [
        ((10, 0, 3), 0, "10 rows done in 3 chunk(s)"),
        ((4, 2, 1), 0, "4 rows done, 2 of them failed, in 1 chunk(s)"),
        ((12, 0, 3), 1, "12 rows done in 3 chunk(s); 1 chunk not finished"),
        ((1200, 1, 3), 2, "1,200 rows done, 1 of them failed, in 3 chunk(s); 2 chunks not finished"),
    ],
)
def test_rows_message(args: tuple[int, int, int], unfinished: int, expected: str) -> None:
    assert rows_message(*args, unfinished=unfinished) == expected
