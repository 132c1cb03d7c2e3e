"""A chunk reads a window of its dataset: ``skip_rows`` then ``max_rows`` rows, numbered as in the whole
file, and says whether rows lie past it. Every format gives the same windows as reading it whole."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from mloc.executors.dataset_io import RawRow, open_dataset
from mloc.spec.dataset import DatasetInput

ROWS: list[dict[str, Any]] = [{"prompt": f"row {i}", "n": i} for i in range(23)]


def write(tmp_path: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        # Blank lines are not rows: a window counts rows, not lines.
        path.write_text("".join(json.dumps(row) + ("\n\n" if i % 5 == 0 else "\n") for i, row in enumerate(ROWS)))
    elif fmt == "csv":
        path = tmp_path / "rows.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["prompt", "n"])
            writer.writeheader()
            writer.writerows({"prompt": row["prompt"] + ("\nsecond line" if row["n"] == 3 else ""), "n": row["n"]}
                             for row in ROWS)  # fmt: skip
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "rows.parquet"
        # Small row groups, so a window starts inside one and row groups before it are passed over.
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=4)
    return path


def window(path: Path, skip: int, rows: int | None) -> tuple[list[RawRow], bool | None, int | None]:
    source = DatasetInput(path=str(path), skip_rows=skip, max_rows=rows)
    with open_dataset(source, results_dir=path.parent) as dataset:
        read = list(dataset.rows)
        return read, dataset.more, dataset.total


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_windows_cover_the_file_in_order_and_know_when_it_ends(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt)
    whole, more, _ = window(path, 0, None)
    assert [row.number for row in whole] == list(range(23)) and more is False
    pieces = []
    for skip in range(0, 30, 6):
        read, more, total = window(path, skip, 6)
        pieces += read
        assert [row.number for row in read] == list(range(skip, min(skip + 6, 23)))
        assert more is (skip + 6 < 23), skip
        if fmt == "parquet":
            assert total == len(read)  # Parquet knows its row count, so a window knows its own
    assert [row.values for row in pieces] == [row.values for row in whole]
    assert [int(row.values["n"]) for row in pieces if row.values] == list(range(23))
    if fmt == "jsonl":
        # Line numbers (for messages) count the blank lines passed over before the window too.
        assert [row.line for row in pieces] == [row.line for row in whole] and pieces[6].line == 9


def test_a_window_ending_exactly_at_the_last_row_says_there_is_no_more(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl")
    read, more, _ = window(path, 17, 6)
    assert [row.number for row in read] == list(range(17, 23)) and more is False
