"""Reading an inference task's dataset as a stream of rows, a batch at a time, whatever its size.

JSONL is read line by line and CSV with the ``csv`` module, both through fsspec (local files, ``s3://``
and any other fsspec URL; ``.gz`` and the like are decompressed on the way); Parquet one record batch at
a time with pyarrow; a Hugging Face dataset from the worker's cache through ``datasets``, which maps its
Arrow files rather than loading them. Memory holds one batch of rows, never the file.

A row that cannot be read (a line that is not a JSON object, a CSV line with surplus cells) is not an
error of the whole dataset: it comes out as a :class:`RawRow` with ``problem`` set, and the executor
decides what a bad row costs. A source that cannot be opened at all raises :class:`ExecutionError`.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from mloc.errors import ExecutionError
from mloc.spec.dataset import RESULT_LINES, DatasetInput, HuggingFaceDataset

if TYPE_CHECKING:
    from mloc.artifacts import ArtifactStore

# Rows pyarrow decodes at once: a Parquet row group can hold millions, so never a whole one.
PARQUET_BATCH = 1024
PARQUET_BUFFER = 1 << 20


@dataclass(frozen=True)
class RawRow:
    """One row as read: its values, or why it could not be read."""

    number: int  # 0-based, counting rows (a JSONL file's blank lines and a CSV header are not rows)
    values: dict[str, Any] | None
    problem: str | None = None
    line: int | None = None  # 1-based line in a text file, for messages

    @property
    def where(self) -> str:
        return f"row {self.number}" + (f" (line {self.line})" if self.line is not None else "")


@dataclass
class Dataset:
    """An opened source: a label for messages, its row count when the format tells it, and its rows
    (those of ``skip_rows`` .. ``skip_rows + max_rows``, numbered as in the whole source)."""

    label: str
    total: int | None
    rows: Iterator[RawRow]
    default_text_column: str = "prompt"
    default_id_column: str | None = None  # None: the row number
    # Whether the source has rows after the window read: known once ``rows`` is exhausted.
    more: bool | None = None


class _Window:
    """At most ``limit`` rows of ``rows``; once they are read, one more is looked for, so the
    dataset can say whether rows lie beyond (a chunk's successor is needed)."""

    def __init__(self, dataset: Dataset, rows: Iterator[RawRow], limit: int | None, known_more: bool | None) -> None:
        self.dataset, self.rows, self.left, self.known_more = dataset, rows, limit, known_more

    def __iter__(self) -> Iterator[RawRow]:
        return self

    def __next__(self) -> RawRow:
        if self.left is not None and self.left <= 0:
            if self.dataset.more is None:
                self.dataset.more = self.known_more if self.known_more is not None else _has_next(self.rows)
            raise StopIteration
        try:
            row = next(self.rows)
        except StopIteration:
            self.dataset.more = False
            raise
        if self.left is not None:
            self.left -= 1
        return row


def _has_next(rows: Iterator[RawRow]) -> bool:
    return next(rows, None) is not None


def _windowed(dataset: Dataset, source: DatasetInput, total_all: int | None = None) -> Dataset:
    """``dataset`` cut to ``source.max_rows`` rows (its reader already skipped ``skip_rows``)."""
    limit = source.max_rows
    known_more = None
    if total_all is not None:
        left = max(total_all - source.skip_rows, 0)
        dataset.total = left if limit is None else min(left, limit)
        known_more = limit is not None and left > limit
    dataset.rows = _Window(dataset, dataset.rows, limit, known_more)
    return dataset


def batches(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    """``rows`` in lists of ``size`` (the last may be shorter)."""
    while batch := list(itertools.islice(rows, size)):
        yield batch


@contextmanager
def open_dataset(source: DatasetInput, *, results_dir: Path) -> Iterator[Dataset]:
    """Open ``source`` for reading; its file (if any) is closed when the block ends."""
    skip = source.skip_rows
    if source.huggingface is not None:
        in_split, rows = _huggingface(source.huggingface, skip)
        label = f"Hugging Face dataset {source.huggingface.name!r} (split {source.huggingface.split!r})"
        yield _windowed(Dataset(label, None, rows), source, in_split)
        return
    if source.task is not None:
        fs, url, label = task_lines(source.task, results_dir)
        with _open_binary(url, label, fs) as handle:
            yield _windowed(Dataset(label, None, _jsonl(handle, label, skip), "output", "id"), source)
        return
    assert source.path is not None
    url = os.path.expanduser(source.path) if "://" not in source.path else source.path
    label = f"dataset {source.path}"
    fmt = source.resolved_format
    with _open_binary(url, label) as handle:
        if fmt == "parquet":
            total_all, rows = _parquet(handle, label, skip)
            yield _windowed(Dataset(label, None, rows), source, total_all)
        elif fmt == "csv":
            yield _windowed(Dataset(label, None, _csv(handle, label, skip)), source)
        else:
            yield _windowed(Dataset(label, None, _jsonl(handle, label, skip)), source)


def check_reachable(source: DatasetInput) -> None:
    """Open a ``path`` source's file and close it: a missing file or an unreadable URL fails the task
    before its model is loaded (minutes, for some), with the error :func:`open_dataset` would give."""
    if source.path is None:
        return
    url = os.path.expanduser(source.path) if "://" not in source.path else source.path
    with _open_binary(url, f"dataset {source.path}"):
        pass


@contextmanager
def _open_binary(url: str, label: str, fs: Any = None) -> Iterator[IO[bytes]]:
    """``url`` through fsspec, or through ``fs`` (a file system already set up, the artifact store's)."""
    import fsspec

    try:
        if fs is not None:
            handle = fs.open(url, "rb")
        else:
            # A URL in the artifact store (a batch's rows) is read with the store's settings and credentials.
            store = _artifact_store(label)
            in_store = store.open_url(url) if store is not None and "://" in url else None
            handle = in_store or fsspec.open(url, "rb", compression="infer").open()
    except FileNotFoundError as exc:
        # A store says which part is missing ("The specified bucket does not exist"); a bare path says nothing more.
        said = str(exc.args[-1]) if exc.args else ""
        detail = f": {said}" if said and said not in url else ""
        raise ExecutionError(
            f"{label} does not exist (as the worker sees it{detail}); inference.input.path must be a file on the "
            "worker, or a URL it can read (s3://bucket/key, https://...)"
        ) from None
    except ImportError as exc:
        raise ExecutionError(
            f"{label}: the worker cannot read this kind of URL: {exc}; install the file system's package "
            "(s3:// needs pip install 'mloc[s3]')"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ExecutionError(f"{label} could not be opened: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # botocore's, for an s3:// URL: named, not imported, as a worker without the s3 extra lacks it.
        kind = type(exc).__name__
        if kind == "NoCredentialsError":
            raise ExecutionError(
                f"{label} could not be read: the worker has no AWS credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the worker's environment, and AWS_ENDPOINT_URL for an "
                "S3-compatible service"
            ) from None
        if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            raise ExecutionError(
                f"{label} could not be read: {exc}; for an S3-compatible service set AWS_ENDPOINT_URL to its address "
                "in the worker's environment (MLOC_ARTIFACT_STORE_OPTIONS applies to the artifact store alone)"
            ) from None
        raise
    try:
        yield handle
    finally:
        handle.close()


def _artifact_store(label: str) -> ArtifactStore | None:
    from mloc.artifacts import store_for
    from mloc.errors import ConfigError
    from mloc.settings import Settings

    try:
        return store_for(Settings())
    except ConfigError as exc:
        raise ExecutionError(f"{label}: the artifact store is misconfigured: {exc.message}") from exc


def _jsonl(handle: IO[bytes], label: str, skip: int = 0) -> Iterator[RawRow]:
    number = passed = 0
    lines = iter(handle)
    try:
        # Rows before the window are counted, not parsed: a chunk far into a file passes them fast.
        while number < skip:
            raw = next(lines, None)
            if raw is None:
                return
            passed += 1
            if raw.strip():
                number += 1
        for line_number, raw in enumerate(lines, start=passed + 1):
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield RawRow(number, None, f"not valid JSON ({exc}); each line must be one JSON object", line_number)
            else:
                if isinstance(value, dict):
                    yield RawRow(number, value, None, line_number)
                else:
                    yield RawRow(number, None, f"a JSON {type(value).__name__}, not an object", line_number)
            number += 1
    except OSError as exc:
        raise ExecutionError(f"{label} stopped being readable at row {number}: {exc}") from exc


def _csv(handle: IO[bytes], label: str, skip: int = 0) -> Iterator[RawRow]:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    reader = csv.DictReader(text)
    number = skip
    try:
        # A quoted cell may hold newlines, so the rows before the window are parsed to be counted.
        for _ in itertools.islice(reader, skip):
            pass
        for row in reader:
            # DictReader puts surplus cells under the None key and fills missing ones with None.
            if None in row or any(value is None for value in row.values()):
                cells = len(reader.fieldnames or [])
                yield RawRow(number, None, f"the number of cells differs from the header's {cells}", reader.line_num)
            else:
                yield RawRow(number, dict(row), None, reader.line_num)
            number += 1
    except UnicodeDecodeError as exc:
        raise ExecutionError(
            f"{label} is not UTF-8 text (at row {number}, byte {exc.start} of a block); save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise ExecutionError(f"{label} line {reader.line_num}: not readable as CSV: {exc}") from exc
    finally:
        # The caller closes the file itself; when it did before this reader was dropped, detaching
        # (which flushes) would raise on the closed file.
        if not text.closed:
            text.detach()


def _parquet(handle: IO[bytes], label: str, skip: int = 0) -> tuple[int | None, Iterator[RawRow]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ExecutionError(
            f"{label} is Parquet, and this worker lacks pyarrow to read it; pip install pyarrow, or give JSONL/CSV"
        ) from None
    try:
        # Buffered reads of one column chunk at a time, decoded on this thread: pyarrow's defaults (whole
        # row groups pre-buffered, decoded by a thread pool) hold a row group several times over, and a
        # row group can be millions of rows (measured: 43 MiB instead of 103 MiB growth at 1M rows).
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=PARQUET_BUFFER)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ExecutionError(f"{label} is not a Parquet file: {exc}") from exc

    # Whole row groups before the window are not read at all.
    first_group, number = 0, 0
    meta = parquet.metadata
    while first_group < meta.num_row_groups and number + meta.row_group(first_group).num_rows <= skip:
        number += meta.row_group(first_group).num_rows
        first_group += 1

    def rows() -> Iterator[RawRow]:
        nonlocal number
        groups = list(range(first_group, meta.num_row_groups))
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups, use_threads=False):
                if number + batch.num_rows <= skip:
                    number += batch.num_rows
                    continue
                if number < skip:
                    batch, number = batch.slice(skip - number), skip
                for values in batch.to_pylist():
                    yield RawRow(number, values)
                    number += 1
        except (OSError, ValueError) as exc:
            raise ExecutionError(f"{label}: Parquet data unreadable after row {number}: {exc}") from exc

    return meta.num_rows, rows()


def libraries_offline() -> None:
    """Workers never reach the hub. The libraries read these switches when first imported, so a process
    that imported them earlier is switched too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        loaded = sys.modules.get(module)
        for name in names:
            if loaded is not None and hasattr(loaded, name):
                setattr(loaded, name, True)


def _huggingface(source: HuggingFaceDataset, skip: int) -> tuple[int, Iterator[RawRow]]:
    """A dataset from the worker's caches: the hub cache (``huggingface-cli download --repo-type dataset``
    leaves its files there), else the ``datasets`` cache of one loaded on this machine before."""
    label = f"Hugging Face dataset {source.name!r} (split {source.split!r})"
    libraries_offline()
    try:
        import datasets
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ExecutionError(
            f"{label}: this worker lacks the datasets library; pip install 'mloc[train]' (or datasets)"
        ) from None
    try:
        try:
            where = snapshot_download(source.name, repo_type="dataset", local_files_only=True)
        except Exception:  # not in the hub cache: datasets' own cache may still hold it
            where = source.name
        loaded = datasets.load_dataset(where, source.config, split=source.split)
    except Exception as exc:
        raise ExecutionError(
            f"{label} could not be read: {exc}; workers read hub datasets from their local cache only "
            "(HF_HOME / HF_DATASETS_CACHE): download it on a machine with access and copy the cache, or give "
            "inference.input.path"
        ) from exc

    def rows() -> Iterator[RawRow]:
        # Row by row from memory-mapped Arrow files: nothing is loaded whole.
        for number in range(skip, len(loaded)):
            yield RawRow(number, dict(loaded[number]))

    return len(loaded), rows()


def task_lines(task_id: str, results_dir: Path) -> tuple[Any, str, str]:
    """Where another task's result lines are: its folder in this worker's RESULTS_DIR, else the artifact
    store (the highest attempt that published them). Returns the file system to open them with (None for
    a local path), the path, and a label."""
    label = f"the result lines of task {task_id}"
    local = results_dir / task_id / RESULT_LINES
    if local.is_file():
        return None, str(local), label
    store = _artifact_store(label)
    if store is not None:
        try:
            attempts = sorted(
                (int(name) for entry in store.fs.ls(f"{store.root}/{task_id}", detail=False)
                 if (name := entry.rstrip("/").rsplit("/", 1)[-1]).isdigit()),
                reverse=True,
            )  # fmt: skip
        except FileNotFoundError:
            attempts = []
        except OSError as exc:
            raise ExecutionError(f"{label}: the artifact store {store.url} cannot be read: {exc}") from exc
        for attempt in attempts:
            listing = store.listing(task_id, attempt)
            if listing is not None and any(item.path == RESULT_LINES for item in listing.items):
                return store.fs, f"{store.root}/{task_id}/{attempt}/files/{RESULT_LINES}", label
    raise ExecutionError(
        f"task {task_id} has no result lines this worker can read (not in {results_dir / task_id}"
        f"{', nor in the artifact store' if store is not None else ''}); name a succeeded inference task that read "
        "a dataset, or set MLOC_ARTIFACT_STORE so workers share results"
    )
