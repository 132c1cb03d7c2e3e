"""Load a task's training data into plain records, check their shape, and name the bad line if not.

Records are read with the standard library where the file format allows it (JSONL, CSV) so that an error
can say which line is wrong; Parquet, ``save_to_disk`` folders and cached hub datasets go through the
``datasets`` library. Every check runs before the model is loaded, so bad data fails a task in seconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError
from mloc.executors.dataset_io import libraries_offline
from mloc.spec.train import DatasetFormat, DatasetSpec

Record = dict[str, Any]

# The columns each format needs; a record may carry more (GRPO reward functions read extra columns).
REQUIRED: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DatasetFormat.MESSAGES: ("messages",),
    DatasetFormat.TEXT: ("text",),
    DatasetFormat.PREFERENCE: ("prompt", "chosen", "rejected"),
    DatasetFormat.PROMPT: ("prompt",),
}
# Alpaca-style instruction data is common enough to take as prompt/completion.
ALPACA = ("instruction", "output")


@dataclass
class LoadedData:
    """Checked records, split into train and optional eval, with where they came from."""

    train: list[Record]
    eval: list[Record] | None
    format: DatasetFormat
    source: str


def _where(source: str, index: int, line: int | None) -> str:
    return f"{source} line {line}" if line is not None else f"{source}[{index}]"


def _read_jsonl(path: Path) -> Iterable[tuple[Record, int]]:
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ExecutionError(
                    f"dataset {path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line of a .jsonl file must be one JSON object"
                ) from None
            if not isinstance(item, dict):
                raise ExecutionError(f"dataset {path} line {number}: expected a JSON object, got {type(item).__name__}")
            yield item, number


def _read_json(path: Path) -> Iterable[tuple[Record, int | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExecutionError(f"dataset {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ExecutionError(f"dataset {path}: a .json dataset must be a list of objects (or JSON lines)")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ExecutionError(f"dataset {path}[{index}]: expected an object, got {type(item).__name__}")
        yield item, None


def _read_csv(path: Path) -> Iterable[tuple[Record, int]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # DictReader puts surplus cells under the None key; that is a malformed row.
            if None in row or any(value is None for value in row.values()):
                raise ExecutionError(
                    f"dataset {path} line {reader.line_num}: the number of cells differs from the header's "
                    f"{len(reader.fieldnames or [])}; quote cells that contain commas"
                )
            yield dict(row), reader.line_num


def _read_with_datasets(spec: DatasetSpec, path: Path | None) -> list[Record]:
    import datasets

    try:
        if path is not None and path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise ExecutionError(f"dataset {path} has no split {spec.split!r}; it has {list(loaded)}")
                loaded = loaded[spec.split]
        elif path is not None:
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            assert spec.identifier is not None
            loaded = _load_cached_hub_dataset(spec.identifier, spec.split)
    except ExecutionError:
        raise
    except Exception as exc:
        what = f"dataset {path}" if path is not None else f"dataset {spec.identifier!r} (split {spec.split!r})"
        hint = (
            "; hub datasets are read from the local cache only (HF_HOME / HF_DATASETS_CACHE): download it "
            "on a machine with access and copy the cache, or give dataset.path"
            if path is None
            else ""
        )
        raise ExecutionError(f"{what} could not be read: {exc}{hint}") from exc
    return [dict(row) for row in loaded]


def _load_cached_hub_dataset(identifier: str, split: str) -> Any:
    """A hub dataset from this machine's caches: workers never reach the hub."""
    libraries_offline()
    import datasets
    from huggingface_hub import snapshot_download

    try:
        # Files fetched with `huggingface-cli download --repo-type dataset` sit in the hub cache.
        folder = snapshot_download(identifier, repo_type="dataset", local_files_only=True)
    except Exception:
        # Otherwise it may have been loaded (and prepared) by `datasets` on this machine before.
        return datasets.load_dataset(identifier, split=split)
    return datasets.load_dataset(folder, split=split)


def read_records(spec: DatasetSpec) -> tuple[list[tuple[Record, int | None]], str]:
    """All records of the dataset with their line numbers (where the format has lines), and a label."""
    if spec.examples is not None:
        return [(dict(item), None) for item in spec.examples], "dataset.examples"
    if spec.identifier is not None:
        return [(row, None) for row in _read_with_datasets(spec, None)], f"dataset {spec.identifier!r}"
    assert spec.path is not None
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise ExecutionError(
            f"dataset file {path.resolve()} does not exist; dataset.path must be a file on the worker "
            "(JSONL, JSON, Parquet or CSV)"
        )
    suffix = path.suffix.lower()
    rows: Iterable[tuple[Record, int | None]]
    if path.is_dir():
        rows = ((row, None) for row in _read_with_datasets(spec, path))
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        rows = ((row, None) for row in _read_with_datasets(spec, path))
    else:
        raise ExecutionError(
            f"dataset {path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet or .csv"
        )
    try:
        return list(rows), str(path)
    except UnicodeDecodeError as exc:
        raise ExecutionError(f"dataset {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def detect_format(record: Record) -> DatasetFormat | None:
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return DatasetFormat.PREFERENCE
    if "messages" in keys:
        return DatasetFormat.MESSAGES
    if {"prompt", "completion"} <= keys or set(ALPACA) <= keys:
        return DatasetFormat.PROMPT_COMPLETION
    if "text" in keys:
        return DatasetFormat.TEXT
    if "prompt" in keys:
        return DatasetFormat.PROMPT
    return None


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ExecutionError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ExecutionError(f"{where}: messages[{turn}] must be an object with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise ExecutionError(f"{where}: messages[{turn}].content must be text")


def _check_text(record: Record, key: str, where: str) -> None:
    value = record[key]
    # prompt/completion/chosen/rejected may be text or, in TRL's conversational form, a message list.
    if isinstance(value, list):
        _check_messages(value, f"{where} ({key!r})")
    elif not isinstance(value, str):
        raise ExecutionError(f"{where}: {key!r} must be text (or a list of messages), got {type(value).__name__}")


def normalize(record: Record, fmt: DatasetFormat, where: str) -> Record:
    """Check one record against its format and return it in TRL's column names."""
    if fmt == DatasetFormat.PROMPT_COMPLETION and "prompt" not in record and set(ALPACA) <= set(record):
        context = record.get("input") or ""
        prompt = f"{record['instruction']}\n\n{context}" if context else str(record["instruction"])
        rest = {key: value for key, value in record.items() if key not in ("instruction", "input", "output")}
        record = {**rest, "prompt": prompt, "completion": str(record["output"])}
    missing = [key for key in REQUIRED[fmt] if key not in record or record[key] is None]
    if missing:
        raise ExecutionError(
            f"{where}: missing {', '.join(repr(key) for key in missing)} for the {fmt.value} format "
            f"(it has {sorted(record)}); map the data's columns to them with dataset.columns (e.g. "
            f"{{{missing[0]}: <column>}}), set dataset.format, or fix the record"
        )
    if fmt == DatasetFormat.MESSAGES:
        _check_messages(record["messages"], where)
    else:
        for key in REQUIRED[fmt]:
            _check_text(record, key, where)
    return record


def _renamed(record: Record, columns: dict[str, str]) -> Record:
    """The record with its columns named as dataset.columns maps them (a column missing stays missing)."""
    moved = {role: record[column] for role, column in columns.items() if column in record}
    kept = {key: value for key, value in record.items() if key not in columns.values() and key not in columns}
    return {**kept, **moved}


def load_data(spec: DatasetSpec, allowed: tuple[DatasetFormat, ...], *, seed: int) -> LoadedData:
    """Read, check and split the dataset; raises :class:`ExecutionError` naming the bad record."""
    rows, source = read_records(spec)
    if not rows:
        raise ExecutionError(f"{source} has no records")
    if spec.max_samples is not None:
        rows = rows[: spec.max_samples]
    if spec.columns:
        rows = [(_renamed(record, spec.columns), line) for record, line in rows]
    fmt = spec.format
    if fmt == DatasetFormat.AUTO:
        first, line = rows[0]
        detected = detect_format(first)
        # A task that wants prompts only (GRPO, PPO) can use the prompts of richer data.
        if detected not in (None, *allowed) and DatasetFormat.PROMPT in allowed and "prompt" in first:
            detected = DatasetFormat.PROMPT
        if detected is None:
            raise ExecutionError(
                f"{_where(source, 0, line)}: cannot tell the dataset format from its columns "
                f"{sorted(first)}; name the columns the formats read with dataset.columns (e.g. "
                "{prompt: question, completion: answer}), or write them as prompt/completion, messages, text, "
                "prompt/chosen/rejected or prompt"
            )
        fmt = detected
    if fmt not in allowed:
        raise ExecutionError(
            f"{source}: the {fmt.value} format does not fit this task type; it takes "
            f"{', '.join(item.value for item in allowed)}"
        )
    records = [normalize(record, fmt, _where(source, index, line)) for index, (record, line) in enumerate(rows)]
    eval_records: list[Record] | None = None
    if spec.eval_ratio:
        import random

        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        held = max(1, round(len(shuffled) * spec.eval_ratio))
        if held >= len(shuffled):
            raise ExecutionError(
                f"{source}: eval_ratio {spec.eval_ratio} leaves no training data from {len(records)} records"
            )
        eval_records, records = shuffled[:held], shuffled[held:]
    return LoadedData(train=records, eval=eval_records, format=fmt, source=source)
