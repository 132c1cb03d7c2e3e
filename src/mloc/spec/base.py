"""Sections shared by every mloc/v1 task: metadata, resources, the model and the common spec fields."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from mloc.spec.packaged import PACKAGED_MODELS, find_packaged
from mloc.spec.quantity import format_cpu, format_memory, parse_cpu, parse_memory

API_VERSION = "mloc/v1"
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A Hugging Face repo id: a name, or owner/name.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_path(identifier: str) -> bool:
    """Whether a huggingface identifier is meant as a folder on the worker rather than a hub id."""
    return identifier.startswith(("/", "~", ".")) or "\\" in identifier or identifier.count("/") > 1


# On a task whose spec.timeout_sec is the admin's default (MLOC_TASK_TIMEOUTS), not the user's: where it came from.
TIMEOUT_LABEL = "mloc.timeout"
# On a replica group's shard: the index of its first prompt among the group's.
OFFSET_LABEL = "mloc.offset"


class Strict(BaseModel):
    """A section that rejects unknown fields, so a typo is an error instead of a silent default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


CpuMilli = Annotated[
    int,
    BeforeValidator(parse_cpu),
    PlainSerializer(format_cpu, return_type=str),
    Field(json_schema_extra={"type": ["string", "number"], "examples": ["8", "500m", 0.5]}),
]
MemoryBytes = Annotated[
    int,
    BeforeValidator(parse_memory),
    PlainSerializer(format_memory, return_type=str),
    Field(json_schema_extra={"type": ["string", "integer"], "examples": ["32Gi", "512Mi"]}),
]


def field_of(model: object, name: str) -> Any:
    """``model``'s field ``name``, or None where ``model`` is not a model with that field: what
    ``getattr(model, name, None)`` answers for a field, without pydantic's path for a missing one (an
    exception raised and caught, ten times a found field's cost). The orchestrator asks every task it
    takes for sections only some task types have (``model``, ``hyperparameters``, ``eval``)."""
    return model.__dict__.get(name) if isinstance(model, BaseModel) else None


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value) or ".." in value:
        # A name is part of keys, file names and URLs: ASCII only. The fix offers the name made so.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", value.replace("..", "."))[:128].strip("._-")
        fix = f"e.g. {slug!r}" if slug and _NAME.match(slug) else "e.g. 'task-1'"
        raise ValueError(
            f"{what} {value!r} must be 1-128 ASCII letters, digits, '.', '_' or '-', "
            f"starting and ending with a letter or digit; {fix}"
        )
    return value


def unfold_from(data: Any, field: str, what: str) -> Any:
    """A hyperparameters mapping with ``<field>: {from: <task>}`` written as ``<field>_from: <task>``: how a
    reference to another task's collection is written (as ``model.adapter.from`` is) and how it is kept."""
    if not isinstance(data, dict) or not isinstance(data.get(field), dict):
        return data
    reference = data[field]
    if set(reference) != {"from"} or not isinstance(reference["from"], str):
        raise ValueError(
            f"hyperparameters.{field} is a name, or {{from: <task>}} naming the rag_inference task whose collection "
            f"{what}; got keys {', '.join(map(str, reference)) or 'none'}"
        )
    if data.get(f"{field}_from") is not None:
        raise ValueError(f"hyperparameters has {field}.from and {field}_from; keep one")
    unfolded = {key: value for key, value in data.items() if key != field}
    unfolded[f"{field}_from"] = reference["from"]
    return unfolded


def check_local_path(value: str) -> str:
    """A path on the worker without '..' steps, so a task cannot climb out of the folder it names."""
    if ".." in re.split(r"[/\\]", value):
        raise ValueError(f"{value!r} contains '..'; give the folder's absolute path without parent steps")
    return value


class Metadata(Strict):
    name: str | None = Field(None, description="A name for people; defaults to the task type.")
    owner: str | None = Field(None, description="Who the task belongs to; usage is accounted to them.")
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "name")

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "owner")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 64:
            raise ValueError("at most 64 labels")
        for key, item in value.items():
            if len(key) > 128 or len(item) > 256:
                raise ValueError(f"label {key!r}: keys are at most 128 characters, values 256")
        return value


class GpuRequest(Strict):
    type: str = Field("any", description="'any', or a model such as 'A100', 'H100', 'L4', 'RTX 4090'.")
    count: int = Field(0, ge=0, le=64)
    memory: MemoryBytes | None = Field(None, description="Minimum memory per GPU, e.g. '40Gi'.")


class Hardware(Strict):
    cpu: CpuMilli = Field(0, description="CPU cores: '8', '0.5', '500m'.")
    memory: MemoryBytes = Field(0, description="RAM: '32Gi', '512Mi'.")
    gpu: GpuRequest = Field(default_factory=GpuRequest)


class Resources(Strict):
    replicas: int = Field(1, ge=1, le=64)
    hardware: Hardware = Field(default_factory=Hardware)
    tags: list[str] = Field(default_factory=list, description="Tags a worker must all carry.")

    # A worker's tags come from WORKER_TAGS, comma-separated and trimmed: a tag no worker could carry
    # would hold the task for ever.
    @field_validator("tags")
    @classmethod
    def _carriable(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not tag.strip() or tag != tag.strip() or "," in tag:
                raise ValueError(
                    f"tag {tag!r} cannot be carried by a worker (WORKER_TAGS is a comma-separated list, each "
                    "tag trimmed): write each tag without commas or spaces around it, e.g. [gpu-a100, eu-west]"
                )
        return tags


class SourceType(StrEnum):
    HUGGINGFACE = "huggingface"
    LOCAL = "local"
    PACKAGE = "package"
    URL = "url"  # https://.../model.gguf, or s3://bucket/key (a .gguf, or a folder of an HF model)
    TASK = "task"  # the id of a training task whose merged model to load (what source.from becomes)


URL_SCHEMES = ("https://", "http://", "s3://")


def is_url(value: str) -> bool:
    """Whether a model identifier is a URL a worker downloads (the schemes of source type url)."""
    return value.lower().startswith(URL_SCHEMES)


class ModelSource(Strict):
    type: SourceType = SourceType.HUGGINGFACE
    identifier: str = Field(
        "",
        max_length=512,
        description=(
            "Hub id (downloaded by the worker unless cached), a local folder or .gguf file, a packaged model "
            "name, a URL (https://.../x.gguf, s3://bucket/key), or with type task a training task's id."
        ),
    )
    revision: str | None = Field(
        None, max_length=256, description="Hub branch, tag or commit; unset means the repo's default branch."
    )
    from_: str | None = Field(
        None,
        alias="from",
        min_length=1,
        max_length=253,
        description="Instead of an identifier: a training task with hyperparameters.merge_adapter: true (a name "
        "in the same submission, or an id) whose merged model to load; the task waits for it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _url_without_type(cls, data: Any) -> Any:
        if isinstance(data, str):
            # `source: org/model` says what `source: {identifier: org/model}` says.
            data = {"identifier": data}
        # An identifier that is plainly a URL names its own source type; a hub id never holds '://'.
        if isinstance(data, dict) and "type" not in data and is_url(str(data.get("identifier") or "")):
            return {**data, "type": SourceType.URL.value}
        return data

    # Hub ids and package names never hold '..'; a huggingface identifier may also be a local folder.
    @field_validator("identifier")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return check_local_path(value)

    @model_validator(mode="after")
    def _url_shape(self) -> ModelSource:
        if self.from_ is not None:
            # Checked by value, not by the fields given: the wire form repeats the defaults.
            given = [
                name
                for name, value in (("identifier", self.identifier), ("revision", self.revision))
                if value is not None and value != ""
            ]
            if self.type != SourceType.HUGGINGFACE:
                given.append("type")
            if given:
                raise ValueError(
                    f"model.source has 'from' and {', '.join(given)}; 'from' names the training task whose merged "
                    "model to load: keep it alone, or drop it and name the model"
                )
            return self
        if not self.identifier:
            raise ValueError(
                "model.source needs 'identifier' (a hub id, local folder, packaged model name or URL) or 'from' "
                "(a training task whose merged model to load)"
            )
        if self.type == SourceType.TASK:
            if not TASK_ID.match(self.identifier) or self.revision is not None:
                raise ValueError(
                    f"source type task takes the full id of a training task that merged its adapter, not "
                    f"{self.identifier[:80]!r}; `mloc tasks` lists ids (or write source.from with its name)"
                )
            return self
        if self.type == SourceType.PACKAGE and find_packaged(self.identifier) is None:
            known = ", ".join(model.aliases[0] for model in PACKAGED_MODELS)
            raise ValueError(
                f"source.identifier {self.identifier[:80]!r} is not a packaged model; source type package takes "
                f"one of {known} (a Hugging Face id takes source.type huggingface)"
            )
        if self.type == SourceType.URL:
            if not is_url(self.identifier) or len(self.identifier.split("://", 1)[1].strip("/")) == 0:
                raise ValueError(
                    f"source.identifier {self.identifier!r} is not a URL; source type url takes "
                    "https://host/path/model.gguf or s3://bucket/key (a .gguf file or a model folder)"
                )
            if self.revision is not None:
                raise ValueError("source.revision applies to Hugging Face ids only; a URL names one version")
        elif "://" in self.identifier:
            raise ValueError(
                f"source.identifier {self.identifier!r} is a URL but source.type is {self.type.value!r}; "
                "set source.type: url (https:// and s3:// are understood)"
            )
        elif (
            self.type == SourceType.HUGGINGFACE
            and not REPO_ID.match(self.identifier)
            and not looks_like_path(self.identifier)
        ):
            raise ValueError(
                f"source.identifier {self.identifier[:80]!r} is not a Hugging Face id (owner/name: letters, digits, "
                "'-', '_' and '.'); fix the id, or give a folder on the worker as a path (/abs/path or ./folder)"
            )
        return self


class VllmOptions(BaseModel):
    """Passed through to vLLM's engine as keyword arguments."""

    model_config = ConfigDict(extra="allow")

    tensor_parallel_size: int = Field(1, ge=1, le=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    dtype: str | None = None
    enforce_eager: bool | None = None


class AdapterType(StrEnum):
    LORA = "lora"
    QLORA = "qlora"


class Adapter(Strict):
    type: AdapterType = AdapterType.LORA
    r: int = Field(16, ge=1, le=4096)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    path: str | None = Field(None, description="At inference: a LoRA folder, or the id of the task that made it.")
    from_: str | None = Field(
        None,
        alias="from",
        min_length=1,
        max_length=253,
        description="At inference and eval: the training task (a name in the same submission, or an id) whose "
        "adapter to load; the task waits for it.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else check_local_path(value)

    @model_validator(mode="after")
    def _one_origin(self) -> Adapter:
        if self.path is not None and self.from_ is not None:
            raise ValueError("model.adapter has both 'path' and 'from'; keep one")
        return self


class Engine(StrEnum):
    AUTO = "auto"
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


def _source_schema(schema: dict[str, Any]) -> None:
    """The schema says what the validator takes: ``source`` is a mapping, or a string that is its identifier."""
    ref = schema.pop("$ref")
    schema["anyOf"] = [
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 512,
            "description": "The model's identifier alone (its type read as for source.identifier).",
        },
        {"$ref": ref},
    ]


class ModelSpec(Strict):
    source: ModelSource = Field(json_schema_extra=_source_schema)
    engine: Engine = Field(Engine.AUTO, description="Inference engine; 'auto' takes vLLM where installed.")
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    adapter: Adapter | None = None


class Condition(Strict):
    """Run a task only when an eval task's score passes (a quality gate); otherwise it is skipped
    (cancelled, the scores in its reason). The task waits for the eval tasks it names."""

    from_: str = Field(
        ...,
        alias="from",
        min_length=1,
        max_length=253,
        description="The eval task whose score decides: a name in the same submission, or an id.",
    )
    score: str = Field(
        ...,
        min_length=3,
        max_length=300,
        description="'<task>/<metric>' as the eval task's scores name it, e.g. 'arith/acc' or 'hellaswag/acc_norm'.",
    )
    min: float | None = Field(None, description="Run only if the score is at least this.")
    max: float | None = Field(None, description="Run only if the score is at most this (for lower-is-better scores).")
    beats: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Another eval task (name or id): run only if the score is higher than that task's same score "
        "(lower, with lower_is_better).",
    )
    lower_is_better: bool = Field(False, description="For 'beats': the lower score wins (perplexity, ter).")

    @field_validator("score")
    @classmethod
    def _score(cls, value: str) -> str:
        task, _, metric = value.partition("/")
        if not task or not metric:
            raise ValueError(
                f"when.score {value[:80]!r} is not '<task>/<metric>'; write the eval task's task name and metric, "
                "e.g. 'arith/acc' (GET /api/v1/tasks/{id}/metrics lists a finished eval's scores)"
            )
        return value

    @model_validator(mode="after")
    def _has_test(self) -> Condition:
        if self.min is None and self.max is None and self.beats is None:
            raise ValueError("when needs a test: 'min', 'max' and/or 'beats' (another eval task)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"when.min {self.min} is above when.max {self.max}; no score could pass")
        if self.beats is not None and self.beats == self.from_:
            raise ValueError("when.beats names the same task as when.from; name the eval task to compare with")
        return self

    @property
    def task(self) -> str:
        return self.score.partition("/")[0]

    @property
    def metric(self) -> str:
        return self.score.partition("/")[2]


class SpecBase(Strict):
    """Fields every task type shares; each task type subclasses it and fixes ``task_type``."""

    kind: ClassVar[str]
    task_type: str = Field(..., alias="taskType")
    topic: str | None = Field(None, max_length=128, description="Queue topic; defaults to 'tasks.<taskType>'.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    retries: int | None = Field(
        None, ge=0, le=100, description="Times the task is retried after its worker is lost or its executor crashes."
    )
    retry_backoff_sec: float | None = Field(
        None,
        ge=0,
        le=86_400,
        description="Wait before retry n: this times 2**(n-1), at most MLOC_RETRY_BACKOFF_MAX_SEC; 0 retries at once.",
    )
    resources: Resources = Field(default_factory=Resources)
    timeout_sec: float | None = Field(
        None, gt=0, le=30 * 86_400, description="Longest the task may run; it fails with the reason past that."
    )
    depends_on: list[str] = Field(
        default_factory=list,
        alias="dependsOn",
        max_length=64,
        description="Tasks that must succeed before this one is placed: names of tasks in the same submission "
        "(metadata.name) or ids of existing tasks.",
    )
    on_dependency_failure: Literal["fail", "skip"] = Field(
        "fail",
        alias="onDependencyFailure",
        description="When a task it depends on fails or is cancelled: fail this one, or skip it (cancelled).",
    )
    when: Condition | None = Field(
        None,
        description="Run only if an eval task's score passes (min, max, or beats another eval's); else skipped.",
    )

    @model_validator(mode="after")
    def _replicas_split_prompts(self) -> SpecBase:
        # Replicas split an inference task's prompts between workers; no other task type divides so.
        if self.resources.replicas > 1 and self.task_type != "inference":
            raise ValueError(
                f"resources.replicas > 1 is supported for inference tasks, not {self.task_type!r}; "
                "set it to 1 and submit one task per replica"
            )
        return self

    @field_validator("depends_on")
    @classmethod
    def _depends_on(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip() or len(name) > 253:
                raise ValueError(f"dependsOn entry {name[:80]!r} is not a task name or id")
        if len(set(value)) != len(value):
            raise ValueError("dependsOn names a task twice; list each once")
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "topic")

    @property
    def effective_topic(self) -> str:
        return self.topic or f"tasks.{self.task_type}"

    def model_identifier(self) -> str | None:
        model = field_of(self, "model")
        return model.source.identifier if isinstance(model, ModelSpec) else None


class Document(Strict):
    """The envelope of every task file: apiVersion, kind, metadata and the typed spec."""

    api_version: Literal["mloc/v1"] = Field("mloc/v1", alias="apiVersion")
    kind: str
    metadata: Metadata = Field(default_factory=Metadata)
    spec: SpecBase

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
