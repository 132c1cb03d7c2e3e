"""``inference.input``: a dataset an inference task reads its prompts from, instead of inline prompts.

Exactly one source: a file (``path``: local, ``s3://`` or any fsspec URL; JSONL, CSV or Parquet), a
dataset in the worker's Hugging Face cache (``huggingface``), or the result lines of another task
(``task``). ``columns`` says which column holds the prompt (or the chat), the row's id and per-row
sampling values. The executor reads the rows in batches, so a dataset may be far larger than memory.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import Strict
from mloc.spec.taskgraph import TASK_ID_OR_PREFIX

# The file a dataset task writes its result lines to, in the task's result folder (one JSON object per row).
RESULT_LINES = "results.jsonl"
# Beside it: a fingerprint of the row each line answers, so a later run of the same rows keeps the
# lines that still answer them (mloc.executors.inference_dataset.ResultLines).
ROW_PRINTS = ".row-prints"
# Beside the lines: how many of their bytes a run's recorded usage counted (the worker writes it once
# it recorded a run's end or hand-back). Lines past it were written by a run whose worker was lost, so
# their tokens were never counted: the run that keeps them counts them. Carried on a resume too.
COUNTED_BYTES = ".counted-bytes"
# Rows per chunk when a task does not say: a lost worker redoes at most this many (only those it had
# not finished, where the next worker reads the same results dir), and each chunk re-opens the dataset
# and passes over the rows before it, so much smaller would cost more than it saves.
DEFAULT_CHUNK_ROWS = 2000
# On a chunk's task: its index in the dataset task it belongs to (mloc.parent names that task).
CHUNK_LABEL = "mloc.chunk"
# The sampling fields a row may set for itself; ``n`` is left out because it changes a line's shape.
ROW_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")

DatasetFileFormat = Literal["auto", "jsonl", "csv", "parquet"]


class HuggingFaceDataset(Strict):
    """A dataset already in the worker's Hugging Face cache (HF_HOME / HF_DATASETS_CACHE); workers never
    download."""

    name: str = Field(..., min_length=1, max_length=256, description="The dataset's hub id, e.g. 'org/questions'.")
    config: str | None = Field(None, max_length=256, description="The configuration (subset), if it has several.")
    split: str = Field("train", min_length=1, max_length=256)


class DatasetColumns(Strict):
    """Which column plays which part. The text is read from 'prompt' (or a chat from 'messages') unless
    named; the id and the per-row sampling values only from the columns named here."""

    prompt: str | None = Field(None, min_length=1, max_length=256, description="Completion prompt; default 'prompt'.")
    messages: str | None = Field(
        None, min_length=1, max_length=256, description="A chat (list of {role, content}); used instead of prompt."
    )
    id: str | None = Field(None, min_length=1, max_length=256, description="The row's id; default: its row number.")
    max_tokens: str | None = Field(None, min_length=1, max_length=256)
    temperature: str | None = Field(None, min_length=1, max_length=256)
    top_p: str | None = Field(None, min_length=1, max_length=256)
    top_k: str | None = Field(None, min_length=1, max_length=256)
    stop: str | None = Field(None, min_length=1, max_length=256)
    seed: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_text(self) -> DatasetColumns:
        if self.prompt is not None and self.messages is not None:
            raise ValueError(
                "inference.input.columns names both 'prompt' and 'messages'; a row is either a completion "
                "prompt or a chat: keep one"
            )
        return self

    def sampling(self) -> dict[str, str]:
        """Sampling field -> the column that overrides it per row."""
        return {name: column for name in ROW_SAMPLING if (column := getattr(self, name)) is not None}


class DatasetInput(Strict):
    """Where an inference task's rows come from and how each is read."""

    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="A local file, s3://bucket/key or another fsspec URL (JSONL, CSV or Parquet).",
    )
    huggingface: HuggingFaceDataset | None = None
    task: str | None = Field(
        None,
        description="Another task's id, or its start as `mloc tasks` shows it: its result lines (results.jsonl) "
        "as rows.",
    )
    from_: str | None = Field(
        None,
        alias="from",
        min_length=1,
        max_length=253,
        description="Another task of the same submission (its metadata.name) or an id: its result lines as rows; "
        "this task waits for it.",
    )
    format: DatasetFileFormat = Field(
        "auto", description="auto: by the file's suffix (.jsonl/.ndjson, .csv, .parquet)."
    )
    columns: DatasetColumns = Field(default_factory=DatasetColumns)
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows.")
    skip_rows: int = Field(0, ge=0, description="Start at this row (0-based): the rows before it are not read.")
    chunk_rows: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Rows per chunk. The task runs as chunks, each a task of its own that any worker may take "
        "(a fast worker takes more); a lost worker costs only its unfinished chunk, and a failed or cancelled "
        f"task resumes without redoing finished ones. Default {DEFAULT_CHUNK_ROWS:,}.",
    )
    max_row_errors: int = Field(
        0,
        ge=0,
        description="Bad rows (no prompt, wrong type, too long) each get a result line with 'error' up to this "
        "many; one more fails the task. 0: the first bad row fails it.",
    )

    @field_validator("task")
    @classmethod
    def _task(cls, value: str | None) -> str | None:
        # A start of an id is taken as dependsOn takes one: the orchestrator's plan stores the full id it
        # names, so a worker never reads a prefix.
        if value is not None and not TASK_ID_OR_PREFIX.fullmatch(value.strip().lower()):
            raise ValueError(
                f"inference.input.task {value[:80]!r} is not a task id; give the id of an inference task over a "
                "dataset, or its first 4 or more characters (`mloc tasks` lists them)"
            )
        return value.strip().lower() if value is not None else None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetInput:
        given = [name for name in ("path", "huggingface", "task", "from_") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "inference.input needs exactly one source: 'path' (a JSONL/CSV/Parquet file or URL), "
                f"'huggingface' ({{name, config, split}} in the worker's HF cache), 'task' (a task id) or 'from' "
                f"(a task of the same submission); got {', '.join(n.rstrip('_') for n in given) or 'none'}"
            )
        mistake = url_mistake(self.path) if self.path is not None else None
        if mistake:
            raise ValueError(f"inference.input.path {mistake}")
        if self.format != "auto" and self.path is None:
            raise ValueError("inference.input.format applies to a 'path' only; remove it")
        if self.path is not None and self.format == "auto" and file_format(self.path) is None:
            raise ValueError(
                f"inference.input.path {self.path[:200]!r} does not end in .jsonl, .ndjson, .csv or .parquet; "
                "set inference.input.format to jsonl, csv or parquet"
            )
        return self

    @property
    def resolved_format(self) -> str:
        """The file format to read ``path`` as."""
        if self.format != "auto":
            return self.format
        return file_format(self.path or "") or "jsonl"


# The URL schemes of the file systems a worker reads through fsspec, as users write them.
URL_SCHEMES = (
    "s3",
    "s3a",
    "gs",
    "gcs",
    "az",
    "abfs",
    "abfss",
    "adl",
    "hf",
    "http",
    "https",
    "hdfs",
    "oss",
    "ftp",
    "sftp",
)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)", re.S)


def url_mistake(path: str) -> str | None:
    """What is wrong with ``path`` as a URL of a known scheme ('s3:/bucket/key', 's3:bucket/key'), or None.
    Read as a local path, such a name fails only on the worker, as a file that does not exist."""
    found = _SCHEME.fullmatch(path.strip())
    if found is None or found[1].lower() not in URL_SCHEMES or found[2] == "//":
        return None
    scheme, rest = found[1].lower(), found[3][:200]
    if len(found[2]) > 2:
        return f"{path[:200]!r} names no bucket or host after '{scheme}://'; write '{scheme}://BUCKET/{rest}'"
    return f"{path[:200]!r} is not a URL: it starts '{scheme}:{found[2]}'; write '{scheme}://{rest}'"


def file_format(path: str) -> str | None:
    """The format a file name's suffix says (compression suffixes like .gz are looked through)."""
    name = path.lower().split("?", 1)[0]
    for compressed in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(compressed)
    for suffixes, fmt in (((".jsonl", ".ndjson"), "jsonl"), ((".csv",), "csv"), ((".parquet", ".pq"), "parquet")):
        if name.endswith(suffixes):
            return fmt
    return None
