"""All configuration, read from the environment in one place.

Both seeds' variable names are honoured: the plain ones of the first (``REDIS_URL``, ``PORT``,
``LOG_LEVEL``, ...) and the ``MLOC_``-prefixed ones of the second. Where both are set, the
``MLOC_`` spelling wins.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from mloc.errors import ConfigError
from mloc.spec.quantity import parse_cpu, parse_gpu_list, parse_memory

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A worker id names Redis keys and URL paths (/api/v1/workers/{id}): no spaces, slashes or dots first.
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Also the transition script's, for a Redis no orchestrator has told its own (mloc.keys.FAIR_SHARE_HALF_LIFE).
DEFAULT_FAIR_SHARE_HALF_LIFE_SEC = 3600.0


class NodeType(StrEnum):
    ORCHESTRATOR = "ORCHESTRATOR"
    WORKER = "WORKER"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _split_csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    # No populate_by_name: field names like "home" or "host" must not be read from HOME or HOST.
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    # Shared
    redis_url: str | None = Field(None, validation_alias=_env("MLOC_REDIS_URL", "REDIS_URL"))
    node_type: NodeType = Field(NodeType.WORKER, validation_alias=_env("MLOC_NODE_TYPE"))
    log_level: str = Field("INFO", validation_alias=_env("MLOC_LOG_LEVEL", "LOG_LEVEL"))
    log_json: bool = Field(False, validation_alias=_env("MLOC_LOG_JSON"))
    # Seed 1's orchestrator.log: unset means orchestrator.log for the orchestrator and none for a
    # worker (seed 1: worker logs go to stdout/stderr); "" or "-" means no file for either.
    log_file: str | None = Field(None, validation_alias=_env("MLOC_LOG_FILE", "LOG_FILE"))
    log_max_bytes: int = Field(10 << 20, ge=1024, validation_alias=_env("MLOC_LOG_MAX_BYTES"))
    log_backups: int = Field(5, ge=0, le=1000, validation_alias=_env("MLOC_LOG_BACKUPS"))
    home: Path = Field(Path.home() / ".mloc", validation_alias=_env("MLOC_HOME"))
    # TLS to Redis, used with rediss:// (and rediss+sentinel://) URLs; see mloc.connection.
    redis_tls_ca_file: Path | None = Field(None, validation_alias=_env("MLOC_REDIS_TLS_CA_FILE"))
    redis_tls_cert_file: Path | None = Field(None, validation_alias=_env("MLOC_REDIS_TLS_CERT_FILE"))
    redis_tls_key_file: Path | None = Field(None, validation_alias=_env("MLOC_REDIS_TLS_KEY_FILE"))
    redis_tls_cert_reqs: Literal["required", "optional", "none"] = Field(
        "required", validation_alias=_env("MLOC_REDIS_TLS_CERT_REQS")
    )
    # Where task result folders are published so any host can read them (fsspec URL: file://, s3://,
    # memory://); unset means the worker's RESULTS_DIR. Options are fsspec storage options as JSON.
    artifact_store_url: str | None = Field(None, validation_alias=_env("MLOC_ARTIFACT_STORE"))
    artifact_store_options: str = Field("", validation_alias=_env("MLOC_ARTIFACT_STORE_OPTIONS"))

    # Orchestrator
    orchestrator_token: SecretStr | None = Field(None, validation_alias=_env("ORCHESTRATOR_TOKEN"))
    host: str = Field("0.0.0.0", validation_alias=_env("MLOC_HOST"))
    port: int = Field(8000, ge=1, le=65535, validation_alias=_env("MLOC_PORT", "PORT"))
    heartbeat_ttl_sec: float = Field(120.0, gt=0, validation_alias=_env("HEARTBEAT_TTL_SEC"))
    max_body_bytes: int = Field(1 << 20, gt=0, validation_alias=_env("MLOC_MAX_BODY_BYTES"))
    task_retries: int = Field(2, ge=0, le=100, validation_alias=_env("MLOC_TASK_RETRIES"))
    # The admin's time limit for tasks that set no spec.timeout_sec, per task type, as JSON seconds:
    # {"sft": 86400, "inference": 3600, "*": 172800} ("*": every other type). Empty: no limit.
    task_timeouts: str = Field("", validation_alias=_env("MLOC_TASK_TIMEOUTS"))
    # Times a task may be handed back after its worker was lost, shut down or restarted, apart from its
    # retries (which only its own failures spend); past it the task fails (reason requeues_exhausted).
    max_requeues: int = Field(20, ge=0, le=10_000, validation_alias=_env("MLOC_MAX_REQUEUES"))
    schedule_interval_sec: float = Field(1.0, gt=0, validation_alias=_env("MLOC_SCHEDULE_INTERVAL_SEC"))
    reap_interval_sec: float | None = Field(None, gt=0, validation_alias=_env("MLOC_REAP_INTERVAL_SEC"))
    # A retried task waits retry_backoff_sec * 2**(retry-1), at most retry_backoff_max_sec, before it is placed again.
    retry_backoff_sec: float = Field(5.0, ge=0, le=86_400, validation_alias=_env("MLOC_RETRY_BACKOFF_SEC"))
    retry_backoff_max_sec: float = Field(
        300.0, ge=0, le=7 * 86_400, validation_alias=_env("MLOC_RETRY_BACKOFF_MAX_SEC")
    )
    # Per-user limits for users without their own (`mloc users set-quota`); 0 = unlimited.
    user_max_tasks: int = Field(0, ge=0, le=1_000_000, validation_alias=_env("MLOC_USER_MAX_TASKS"))
    user_max_gpus: int = Field(0, ge=0, le=1_000_000, validation_alias=_env("MLOC_USER_MAX_GPUS"))
    # Fair share orders waiting work by each user's finished work decayed with this half-life
    # (seconds): an hour-old task counts half as much as one that just ended (docs/operations.md).
    fair_share_half_life_sec: float = Field(
        DEFAULT_FAIR_SHARE_HALF_LIFE_SEC, gt=0, le=365 * 86_400, validation_alias=_env("MLOC_FAIR_SHARE_HALF_LIFE_SEC")
    )
    # A waiting task gets a reservation (EASY backfill) once it has waited this long; 0 = none.
    backfill_after_sec: float = Field(60.0, ge=0, le=30 * 86_400, validation_alias=_env("MLOC_BACKFILL_AFTER_SEC"))
    # Finished tasks (records, results, logs) are removed this long after they ended; 0 = kept forever.
    task_retention_sec: float = Field(30 * 86_400.0, ge=0, validation_alias=_env("MLOC_TASK_RETENTION_SEC"))
    # A submit's Idempotency-Key is kept this long: the same submit sent again within it answers as the first.
    idempotency_ttl_sec: float = Field(86_400.0, ge=1, validation_alias=_env("MLOC_IDEMPOTENCY_TTL_SEC"))

    # Worker
    task_topics: str = Field("tasks.inference", validation_alias=_env("TASK_TOPICS", "MLOC_TASK_TOPICS"))
    results_dir: Path = Field(Path("./results"), validation_alias=_env("RESULTS_DIR", "MLOC_RESULTS_DIR"))
    heartbeat_interval_sec: float = Field(30.0, gt=0, validation_alias=_env("HEARTBEAT_INTERVAL_SEC"))
    worker_id: str | None = Field(None, validation_alias=_env("WORKER_ID", "MLOC_WORKER_ID"))
    worker_tags: str = Field("", validation_alias=_env("WORKER_TAGS", "MLOC_WORKER_TAGS"))
    worker_slots: int = Field(4, ge=1, le=1024, validation_alias=_env("MLOC_WORKER_SLOTS"))
    # Advertised capacity overrides: a worker may offer less than it has, and tests describe
    # GPUs a machine without one cannot detect ("NVIDIA A100-SXM4-80GB:2:81920" = model:count:MiB).
    worker_gpus: str | None = Field(None, validation_alias=_env("MLOC_WORKER_GPUS"))
    worker_cpu: str | None = Field(None, validation_alias=_env("MLOC_WORKER_CPU"))
    worker_memory: str | None = Field(None, validation_alias=_env("MLOC_WORKER_MEMORY"))
    shutdown_grace_sec: float = Field(30.0, ge=0, validation_alias=_env("MLOC_SHUTDOWN_GRACE_SEC"))
    # A task's log stream expires this long after its last line (and after its run ends).
    log_retention_sec: float = Field(7 * 86_400.0, gt=0, validation_alias=_env("MLOC_LOG_RETENTION_SEC"))
    # How long a cancelled or timed-out executor may take to stop before its process is killed.
    cancel_grace_sec: float = Field(10.0, ge=0, validation_alias=_env("MLOC_CANCEL_GRACE_SEC"))
    models_dir: Path | None = Field(None, validation_alias=_env("MLOC_MODELS_DIR"))
    # Memory an executor process may keep in loaded models (LRU); unset means half the machine's RAM.
    model_cache_bytes: int | None = Field(None, ge=0, validation_alias=_env("MLOC_MODEL_CACHE_BYTES"))
    vllm_model: str | None = Field(None, validation_alias=_env("VLLM_MODEL"))
    # Task types whose executors run under another Python environment: "ppo=/opt/ppo/bin/python,...".
    executor_python: str = Field("", validation_alias=_env("MLOC_EXECUTOR_PYTHON"))
    # RAG and agents. The python tool runs model-written code in a sandbox; a worker opts in.
    allow_python_tool: bool = Field(False, validation_alias=_env("MLOC_ALLOW_PYTHON_TOOL"))
    vectors_dir: Path | None = Field(None, validation_alias=_env("MLOC_VECTORS_DIR"))
    # lm-eval harness tasks whose data the worker holds beyond those it finds in its dataset cache
    # ("squadv2,scrolls_qasper"): advertised with them, so eval tasks naming them are placed here.
    eval_harness_tasks: str = Field("", validation_alias=_env("MLOC_EVAL_HARNESS_TASKS"))
    # Folders (os.pathsep-separated) tasks may read documents from; unset means anywhere the worker can.
    document_roots: str = Field("", validation_alias=_env("MLOC_DOCUMENT_ROOTS"))
    # Folders (os.pathsep-separated) a user's task may read models and adapters from, besides the
    # models dir and the results of the user's own tasks; the admin's tasks may read any path. Set it
    # alike on the orchestrator (checked at submit) and the workers (checked before the model is read).
    model_roots: str = Field("", validation_alias=_env("MLOC_MODEL_ROOTS"))
    web_search_provider: str = Field("", validation_alias=_env("MLOC_WEB_SEARCH_PROVIDER"))
    searxng_url: str = Field("", validation_alias=_env("MLOC_SEARXNG_URL"))

    # Models the worker downloads (hub ids, https and s3 URLs) are kept under the models dir. A budget
    # for them on disk ("200Gi"; 0 = unlimited): least recently used ones not in use are removed to fit.
    model_downloads_max_bytes: int = Field(0, ge=0, validation_alias=_env("MLOC_MODEL_DOWNLOADS_MAX_BYTES"))
    # Room a download must leave free on the models dir's disk.
    model_downloads_min_free_bytes: int = Field(
        1 << 30, ge=0, validation_alias=_env("MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES")
    )
    # True: never download, a model must already be on the worker. False: download even where
    # HF_HUB_OFFLINE is set (it keeps the libraries themselves off the hub). Unset: follow HF_HUB_OFFLINE.
    offline: bool | None = Field(None, validation_alias=_env("MLOC_OFFLINE"))
    # fsspec storage options (JSON) for s3:// model sources, e.g. {"endpoint_url": "http://minio:9000"}.
    model_source_options: str = Field("", validation_alias=_env("MLOC_MODEL_SOURCE_OPTIONS"))
    # The hub workers download from, and the orchestrator reads a model's config.json from at admission.
    # Read as the Hugging Face libraries read them: an empty value is unset, HF_HUB_OFFLINE is 1/true/yes/on.
    hf_endpoint: str = Field("", validation_alias=_env("HF_ENDPOINT"))
    hf_token: SecretStr | None = Field(None, validation_alias=_env("HF_TOKEN"))
    hf_hub_offline: str = Field("", validation_alias=_env("HF_HUB_OFFLINE"))

    # Memory fit at admission: a GPU task no registered GPU could hold is refused at submit ("refuse"),
    # kept with a warning on the task ("warn": also compares CPU tasks with the largest worker's RAM), or
    # not estimated at all ("off").
    memfit: Literal["refuse", "warn", "off"] = Field("refuse", validation_alias=_env("MLOC_MEMFIT"))
    # How long admission waits for a model's config.json (or GGUF header) from the hub or a URL.
    memfit_fetch_timeout_sec: float = Field(3.0, gt=0, le=60, validation_alias=_env("MLOC_MEMFIT_FETCH_TIMEOUT_SEC"))

    # The OpenAI Batch API: the model names batch lines may give, as JSON: name -> a task's `model` section,
    # e.g. {"tiny": {"source": {"type": "package", "identifier": "mloc-tiny-llama"}}}. Other names are hub ids.
    openai_models: str = Field("", validation_alias=_env("MLOC_OPENAI_MODELS"))
    # Largest file POST /v1/files accepts (OpenAI's own limit for a batch file is 200 MB).
    max_file_bytes: int = Field(200 << 20, gt=0, validation_alias=_env("MLOC_MAX_FILE_BYTES"))

    # Client (CLI)
    api_url: str | None = Field(None, validation_alias=_env("MLOC_API_URL"))
    token: SecretStr | None = Field(None, validation_alias=_env("MLOC_TOKEN"))

    @field_validator("node_type", mode="before")
    @classmethod
    def _upper_node_type(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    # Tokens often come from secret files, which end in a line break no header may carry: the
    # orchestrator and the CLI both strip it, so they compare the same token. A token of whitespace
    # alone is refused rather than read as "no token", which would turn auth off.
    @field_validator("orchestrator_token", "token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        if not isinstance(value, str) or not value:
            return value
        if not value.strip():
            raise ValueError("holds only whitespace; set the token itself, or leave the variable empty for none")
        return value.strip()

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value

    # Checked here, not where the worker first reads them, so a typo stops start-up with one line.
    @field_validator("memfit", mode="before")
    @classmethod
    def _lower_memfit(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("worker_gpus")
    @classmethod
    def _gpu_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_gpu_list(value)
        return value

    @field_validator("task_topics")
    @classmethod
    def _some_topic(cls, value: str) -> str:
        if not _split_csv(value):
            raise ValueError(
                "names no topic; name at least one (tasks.inference, tasks.sft, tasks.*), or unset it for the "
                "default, tasks.inference"
            )
        return value

    @field_validator("worker_cpu")
    @classmethod
    def _cpu_quantity(cls, value: str | None) -> str | None:
        if value:
            parse_cpu(value)
        return value

    @field_validator("worker_memory")
    @classmethod
    def _memory_quantity(cls, value: str | None) -> str | None:
        if value:
            parse_memory(value)
        return value

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, value: str | None) -> str | None:
        if value is not None and not WORKER_ID.match(value):
            raise ValueError(
                f"{value[:80]!r} is not a worker id: use up to 128 letters, digits, '.', '_', ':' or '-', "
                "starting with a letter or digit (it names the worker in URLs and Redis keys)"
            )
        return value

    @field_validator("artifact_store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not _URL_SCHEME.match(value):
            raise ValueError(
                f"{value[:80]!r} is not a URL; write s3://bucket/prefix, file:///shared/folder (an absolute "
                "path) or another fsspec URL, or leave it empty to keep results in RESULTS_DIR"
            )
        return value

    @field_validator("artifact_store_options")
    @classmethod
    def _store_options(cls, value: str) -> str:
        if value.strip():
            parse_store_options(value)
        return value

    @field_validator("executor_python")
    @classmethod
    def _executor_python(cls, value: str) -> str:
        for item in _split_csv(value):
            task_type, _, python = item.partition("=")
            if not task_type.strip() or not python.strip():
                raise ValueError(f"{item!r} is not TASK_TYPE=PYTHON; write e.g. ppo=/opt/mloc-ppo/bin/python")
        return value

    @field_validator("task_timeouts")
    @classmethod
    def _task_timeouts(cls, value: str) -> str:
        if value.strip():
            parse_task_timeouts(value)
        return value

    def default_timeout(self, task_type: str) -> float | None:
        """MLOC_TASK_TIMEOUTS' limit for a task of ``task_type`` that sets none itself."""
        limits = parse_task_timeouts(self.task_timeouts) if self.task_timeouts.strip() else {}
        return limits.get(task_type, limits.get("*"))

    @field_validator("openai_models")
    @classmethod
    def _openai_models(cls, value: str) -> str:
        if value.strip():
            parse_openai_models(value)
        return value

    @field_validator("model_downloads_max_bytes", "model_downloads_min_free_bytes", "max_file_bytes", mode="before")
    @classmethod
    def _byte_quantity(cls, value: object) -> object:
        return parse_memory(value) if isinstance(value, str) else value

    def log_file_for(self, node: NodeType) -> Path | None:
        """The file this process logs to, besides stderr: the orchestrator's only. A worker logs to stderr
        (seed 1), also where one environment names MLOC_LOG_FILE for both: each process would rotate it."""
        if node != NodeType.ORCHESTRATOR:
            return None
        if self.log_file is None:
            return Path("orchestrator.log")
        if self.log_file.strip() in ("", "-"):
            return None
        return Path(self.log_file).expanduser()

    def setup_logging(self, node: NodeType) -> None:
        from mloc.logs import setup

        setup(
            self.log_level,
            json_lines=self.log_json,
            file=self.log_file_for(node),
            max_bytes=self.log_max_bytes,
            backups=self.log_backups,
            file_required=self.log_file is not None and node == NodeType.ORCHESTRATOR,
        )

    @property
    def redis_url_variable(self) -> str:
        """The variable REDIS_URL was read from, to name it where the URL is reported."""
        set_names = {name.upper() for name in os.environ}
        return next((name for name in ("MLOC_REDIS_URL", "REDIS_URL") if name in set_names), "REDIS_URL")

    @property
    def topics(self) -> list[str]:
        return _split_csv(self.task_topics) or ["tasks.inference"]

    @property
    def tags(self) -> list[str]:
        return _split_csv(self.worker_tags)

    @property
    def executor_pythons(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in _split_csv(self.executor_python))
        return {task.strip(): python.strip() for task, python in pairs}

    @property
    def document_root_paths(self) -> list[Path]:
        return [Path(part).resolve() for part in self.document_roots.split(os.pathsep) if part.strip()]

    @property
    def model_root_paths(self) -> list[Path]:
        """MLOC_MODEL_ROOTS as absolute paths, as written (not resolved: the folders may be on workers only)."""
        parts = [part.strip() for part in self.model_roots.split(os.pathsep) if part.strip()]
        return [Path(os.path.abspath(os.path.expanduser(part))) for part in parts]

    @property
    def openai_model_sections(self) -> dict[str, dict[str, Any]]:
        """MLOC_OPENAI_MODELS: model name -> the task's ``model`` section."""
        return parse_openai_models(self.openai_models) if self.openai_models.strip() else {}

    @property
    def reads_hub(self) -> bool:
        """Whether this process may read the hub: MLOC_OFFLINE decides, else HF_HUB_OFFLINE (as for downloads)."""
        if self.offline is not None:
            return not self.offline
        return self.hf_hub_offline.strip().lower() not in ("1", "true", "yes", "on")

    @property
    def hub_url(self) -> str:
        """HF_ENDPOINT, or the Hugging Face Hub itself."""
        return (self.hf_endpoint.strip() or "https://huggingface.co").rstrip("/")

    @property
    def hub_token(self) -> str | None:
        return (self.hf_token.get_secret_value() or None) if self.hf_token else None

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.home / "models"

    def resolved_vectors_dir(self, models_dir: Path | None = None) -> Path:
        """Where named RAG collections persist: MLOC_VECTORS_DIR, else a ``vectors`` folder beside the
        models folder. ``models_dir`` is the folder a run was given (the worker's own); without it, the
        one the worker would use. Always absolute, so every task on a worker, and the store it advertises
        (host:path), name the same folder whatever directory a process runs in."""
        if self.vectors_dir is not None:
            return self.vectors_dir.expanduser().resolve()
        # Resolved as the worker resolves its models folder, without expanding "~", so the default
        # a worker advertises and the one its runs open (beside ctx.models_dir) cannot differ.
        return (models_dir or self.resolved_models_dir).resolve().parent / "vectors"

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or f"http://127.0.0.1:{self.port}").rstrip("/")

    @property
    def client_token(self) -> str | None:
        secret = self.token or self.orchestrator_token
        return secret.get_secret_value() if secret else None

    @property
    def admin_token(self) -> str | None:
        return self.orchestrator_token.get_secret_value() if self.orchestrator_token else None

    @property
    def reap_every_sec(self) -> float:
        return self.reap_interval_sec or max(0.2, min(5.0, self.heartbeat_ttl_sec / 4))


def _json_object(value: str, fix: str) -> dict[str, Any]:
    """A setting's JSON object; ValueError says what is wrong and ``fix``."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc}); {fix}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"is JSON but not an object; {fix}")
    return parsed


def parse_store_options(value: str) -> dict[str, Any]:
    """MLOC_ARTIFACT_STORE_OPTIONS as fsspec storage options; ValueError says what is wrong."""
    return _json_object(value, 'write fsspec storage options, e.g. {"endpoint_url": "http://minio.internal:9000"}')


def parse_task_timeouts(value: str) -> dict[str, float]:
    """MLOC_TASK_TIMEOUTS as task type -> seconds; ValueError says what is wrong."""
    fix = 'write a JSON object of task type -> seconds, e.g. {"sft": 86400, "inference": 3600, "*": 172800}'
    limits = _json_object(value, fix)
    for task_type, seconds in limits.items():
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 30 * 86_400:
            raise ValueError(f"{task_type!r}: {seconds!r} is not a number of seconds between 0 and 30 days; {fix}")
    return {str(task_type): float(seconds) for task_type, seconds in limits.items()}


def parse_openai_models(value: str) -> dict[str, dict[str, Any]]:
    """MLOC_OPENAI_MODELS as a mapping, each section checked as a task's ``model``; ValueError says what is wrong."""
    from mloc.spec.base import ModelSpec

    fix = (
        'write a JSON object of model name -> model section, e.g. {"tiny": {"source": {"type": "package", '
        '"identifier": "mloc-tiny-llama"}}}'
    )
    models = _json_object(value, fix)
    for name, section in models.items():
        try:
            ModelSpec.model_validate(section)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the section"
            raise ValueError(f"model {name!r}: {where}: {first['msg']}; give a task's `model` section") from None
    return models


def _setting(name: str) -> tuple[str, FieldInfo | None]:
    """The environment variable(s) a setting is read from, and its field, given its field name or one of them."""
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if name == field or name.upper() in (c.upper() for c in choices):
            return " / ".join(choices) or field.upper(), info
    return name.upper(), None


def _variables(name: str) -> str:
    """The environment variable(s) a setting is read from, given its field name or one of them."""
    return _setting(name)[0]


# Pydantic's error types for a value that is not a number or a truth value at all, and what to give.
_KINDS = {
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
}


def _example(field: str, kind: str) -> str:
    """What to write instead of a value of the wrong kind: the kind, and the setting's default."""
    wanted = _KINDS.get(kind)
    if wanted is None:
        return ""
    variables, info = _setting(field)
    default = info.default if info is not None else None
    if not isinstance(default, bool | int | float):
        return f"; give {wanted}"
    shown = str(default).lower() if isinstance(default, bool) else f"{default:g}"
    return f"; give {wanted}, e.g. {variables.split(' / ')[0]}={shown} (the default)"


def describe_invalid(exc: ValidationError) -> str:
    """One line per bad setting, naming its variable, the value and what to write instead."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ") + _example(field, error["type"])
        lines.append(f"invalid setting {_variables(field)}={error.get('input')!r}: {message}")
    return "; ".join(lines)


@functools.cache
def get_settings() -> Settings:
    """The process's settings; a bad value raises :class:`ConfigError` naming the variable and the fix."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc)) from None
