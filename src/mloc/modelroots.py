"""Which local folders a task may read models and data from: its model, its adapter, its reward and
value models, the dataset an inference task reads (a local file, or another task's result lines).

On a worker shared by several users a path in a task could name another user's files: the result
folder of their training task, a private model. So a user's task may name local paths only under the
folders the admin allows (MLOC_MODEL_ROOTS), the models dir, and the result folders of the user's
own tasks (and the files the user uploaded for batches, which the orchestrator keeps in the results
dir's files folder); an adapter named by task id must come from one of the user's own tasks. The admin's
tasks (ORCHESTRATOR_TOKEN, and every task while auth is off) may name any path, as before: the admin
already decides what the workers can read. Remote URLs are the user's own business (their credentials
or public data), except a remote artifact store's (MLOC_ARTIFACT_STORE): the workers read it with the
store's credentials, and every user's task files are there, so a user's task may name in it only the
folders of their own tasks.

The orchestrator checks at submit what the spec says, paths as written, so a refusal comes at once.
The worker checks again before the executor reads anything, on the real path (symlinks and '..'
resolved), with its own models and results dirs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, openai_files
from mloc.settings import Settings

TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Kind(StrEnum):
    PATH = "path"  # a local path, whatever it looks like (source type local, an adapter folder)
    MAYBE = "maybe"  # a hub id, unless a local path of that name exists: the resolvers try that first
    TASK = "task"  # the id of the task whose output (adapter, merged model, result lines) to load
    URL = "url"  # a dataset on a remote store (s3://, https://...): checked only where it is the artifact store


@dataclass(frozen=True)
class Reference:
    """A place where a task names a model that may be read from the worker's disk."""

    field: str  # as the user wrote it, e.g. "spec.model.adapter.path"
    value: str
    kind: Kind


def references(spec: Mapping[str, Any]) -> list[Reference]:
    """The model references of a task's spec (its wire form, ``document["spec"]``)."""
    found: list[Reference] = []
    model = spec.get("model") or {}
    source = model.get("source") or {}
    identifier = source.get("identifier")
    source_type = source.get("type") or "huggingface"
    # A packaged model is built by the worker and a URL is downloaded into its models dir: neither reads
    # a path the task names (the spec refuses any other scheme, file:// among them).
    if isinstance(identifier, str) and identifier and source_type not in ("package", "url"):
        kind = {"local": Kind.PATH, "task": Kind.TASK}.get(source_type, Kind.MAYBE)
        found.append(Reference("spec.model.source.identifier", identifier, kind))
    adapter = (model.get("adapter") or {}).get("path")
    if isinstance(adapter, str) and adapter:
        found.append(Reference("spec.model.adapter.path", adapter, Kind.TASK if TASK_ID.match(adapter) else Kind.PATH))
    hyperparameters = spec.get("hyperparameters") or {}
    for name in ("reward_model", "value_model"):
        value = hyperparameters.get(name)
        if isinstance(value, str) and value:
            found.append(Reference(f"spec.hyperparameters.{name}", value, Kind.MAYBE))
    for where, dataset in (
        ("spec.inference.input", (spec.get("inference") or {}).get("input") or {}),
        ("spec.input", spec.get("input") or {}),  # a RAG task's questions
    ):
        if not isinstance(dataset, Mapping):
            continue  # an agent's input is its question, a string: no file to check
        path = dataset.get("path")
        if isinstance(path, str) and path:
            local = _local_path(path)
            if local is None:
                found.append(Reference(f"{where}.path", path, Kind.URL))
            else:
                found.append(Reference(f"{where}.path", local, Kind.PATH))
        task = dataset.get("task")
        if isinstance(task, str) and task:
            found.append(Reference(f"{where}.task", task, Kind.TASK))
    for index, custom in enumerate((spec.get("eval") or {}).get("custom") or []):
        path = custom.get("path") if isinstance(custom, Mapping) else None
        if isinstance(path, str) and path:
            found.append(Reference(f"spec.eval.custom[{index}].path", path, Kind.PATH))
    return found


# URL schemes that read the worker's own disk; any other scheme is a remote store.
_LOCAL_SCHEMES = ("file://", "local://")


def _local_path(value: str) -> str | None:
    """The local path a dataset URL reads, or None for a remote one. A chained URL ("a::b") may end
    on the local disk, so it is taken whole, as a path a user's task may not name."""
    if "::" in value:
        return value
    for scheme in _LOCAL_SCHEMES:
        if value.startswith(scheme):
            return value[len(scheme) :]
    return None if "://" in value else value


def _normal_url(url: str) -> str:
    """A URL as a store sees it: the scheme in lower case, repeated and trailing slashes dropped
    ("S3://b//p/" and "s3://b/p" name the same objects)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{re.sub('/+', '/', rest).strip('/')}"


def looks_local(value: str) -> bool:
    """Whether a hub-or-path value is a path by its look alone (hub ids start with a letter or digit)."""
    return value.startswith(("/", "~", "."))


@dataclass(frozen=True)
class ModelRoots:
    """The folders a user's task may read models from, as absolute paths."""

    roots: tuple[Path, ...]  # MLOC_MODEL_ROOTS and the models dir
    results_dir: Path
    # The artifact store (MLOC_ARTIFACT_STORE) holds every user's task files and batch uploads in the
    # results dir's layout (a folder per task, files/ for uploads), and the workers read it with its
    # credentials: in it, as in the results dir, a user owns only their tasks' folders and uploads.
    store_dir: Path | None = None  # a file:// store
    store: str | None = None  # a remote store's URL, normalised (see _normal_url)

    @classmethod
    def of(cls, settings: Settings, *, models_dir: Path | None = None, results_dir: Path | None = None) -> ModelRoots:
        """From the settings; a worker passes the dirs it uses. Relative settings are taken from here."""
        models = models_dir or settings.resolved_models_dir
        results = results_dir or settings.results_dir
        roots = [*settings.model_root_paths, _absolute(models)]
        url = settings.artifact_store_url
        local = _local_path(url) if url else None
        store_dir = _absolute(Path(local)) if local else None
        store = _normal_url(url) if url and local is None else None
        return cls(tuple(dict.fromkeys(roots)), _absolute(results), store_dir, store)

    def resolved(self) -> ModelRoots:
        """The same folders with symlinks resolved, to compare with resolved paths."""
        store_dir = self.store_dir.resolve() if self.store_dir else None
        roots = tuple(root.resolve() for root in self.roots)
        return ModelRoots(roots, self.results_dir.resolve(), store_dir, self.store)

    def describe(self) -> str:
        folders = ", ".join(str(root) for root in self.roots)
        return f"{folders}, or the result folder of one of your tasks under {self.results_dir}"

    def refusal(self, path: Path, reference: Reference, owner_of_folder: str | None, owner: str) -> str | None:
        """Why a user's task may not read ``path`` (absolute, normalised), or None when it may.
        ``owner_of_folder`` is the owner of the task whose result folder (or of the upload) holds it."""
        for shared, name in ((self.results_dir, "the results dir"), (self.store_dir, "the artifact store")):
            if shared is not None and path.is_relative_to(shared):
                # Checked first: a root that holds the results dir must not open every user's results.
                if owner_of_folder == owner:
                    return None
                return (
                    f"{reference.field} {reference.value!r} is in {name} {shared} but not in the result folder "
                    "of one of your tasks; name one of your own tasks' folders, or the task id itself"
                )
        if any(path.is_relative_to(root) for root in self.roots):
            return None
        return (
            f"{reference.field} {reference.value!r} is outside the folders your tasks may read models and data "
            f"from ({self.describe()}); put the file there, or ask the admin to add its folder to MLOC_MODEL_ROOTS"
        )

    def parts(self, path: Path) -> tuple[str, ...]:
        """``path``'s parts inside the results dir or a file:// store (one layout), else none."""
        for shared in (self.results_dir, self.store_dir):
            if shared is not None and path.is_relative_to(shared):
                return path.relative_to(shared).parts
        return ()

    def uploaded_file(self, path: Path) -> str | None:
        """The id of the uploaded file (POST /v1/files) that ``path`` is, or whose batch rows it holds."""
        return _upload_of(self.parts(path))

    def result_task(self, path: Path) -> str | None:
        """The id of the task whose result folder holds ``path``, if one does."""
        return _task_of(self.parts(path))

    def in_store(self, url: str) -> tuple[str, ...] | None:
        """The parts of a remote ``url`` inside the artifact store, or None when it is not in it."""
        normal = _normal_url(url)
        if self.store is None or not (normal == self.store or normal.startswith(self.store + "/")):
            return None
        return tuple(normal[len(self.store) + 1 :].split("/"))

    def store_refusal(self, reference: Reference, owner_of_folder: str | None, owner: str) -> str | None:
        """Why a user's task may not read the remote URL ``reference`` names, or None: only a URL in the
        artifact store is checked. ``owner_of_folder``: the owner of the task or upload it is in."""
        if self.in_store(reference.value) is None or owner_of_folder == owner:
            return None
        return (
            f"{reference.field} {reference.value[:200]!r} is in the artifact store (MLOC_ARTIFACT_STORE) but not in "
            "the folder of one of your tasks; read another task's result lines with inference.input.task: <task id>"
        )


def _upload_of(parts: tuple[str, ...]) -> str | None:
    return openai_files.upload_id(parts[1]) if len(parts) == 2 and parts[0] == openai_files.FILES_DIR else None


def _task_of(parts: tuple[str, ...]) -> str | None:
    return parts[0] if parts and TASK_ID.match(parts[0]) else None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


async def task_owner(redis: aioredis.Redis, task_id: str) -> str | None:
    owner = await redis.hget(keys.task(task_id), "owner")
    return owner.decode() if isinstance(owner, bytes) else owner


async def check_at_submit(redis: aioredis.Redis, spec: Mapping[str, Any], owner: str, roots: ModelRoots) -> str | None:
    """Why a user's task may not be submitted with these model references, or None. Paths are taken
    as written: the orchestrator cannot see the workers' disks."""

    async def path_refusal(reference: Reference) -> str | None:
        if reference.kind is Kind.MAYBE and not looks_local(reference.value):
            return None  # a hub id; the worker checks that no local folder of that name is read instead
        if reference.value.startswith("~"):
            return (
                f"{reference.field} {reference.value!r} starts in a home folder, which each worker would expand to "
                f"its own user's; give an absolute path under {roots.describe()}"
            )
        if not os.path.isabs(reference.value):
            return (
                f"{reference.field} {reference.value!r} is a relative path, which each worker would read from a "
                f"folder of its own; give an absolute path under {roots.describe()}"
            )
        return await _refusal(redis, roots, Path(os.path.normpath(reference.value)), reference, owner)

    return await _first_refusal(redis, spec, owner, roots, path_refusal)


async def check_on_worker(redis: aioredis.Redis, spec: Mapping[str, Any], owner: str, roots: ModelRoots) -> str | None:
    """Why a user's task may not read the local models it names, or None: each path the executor
    would open, resolved as it would resolve it (from this process's folder, symlinks followed)."""
    real_roots = roots.resolved()

    async def path_refusal(reference: Reference) -> str | None:
        path = Path(reference.value).expanduser()
        try:
            if reference.kind is Kind.MAYBE and not path.exists():
                return None  # not on this disk, so the resolvers take it for a hub id
            real = path.resolve()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a link loop
            return f"{reference.field} {reference.value!r} is not a path this worker can read ({exc})"
        return await _refusal(redis, real_roots, real, reference, owner)

    return await _first_refusal(redis, spec, owner, roots, path_refusal)


async def _first_refusal(
    redis: aioredis.Redis,
    spec: Mapping[str, Any],
    owner: str,
    roots: ModelRoots,
    path_refusal: Callable[[Reference], Awaitable[str | None]],
) -> str | None:
    """The first reason found to refuse one of the task's model references: a task output or a store
    URL by its owner, as neither depends on a disk; a path by ``path_refusal``."""
    for reference in references(spec):
        if reference.kind in (Kind.TASK, Kind.URL):
            refused = await _named_refusal(redis, roots, reference, owner)
        else:
            refused = await path_refusal(reference)
        if refused:
            return refused
    return None


async def _named_refusal(redis: aioredis.Redis, roots: ModelRoots, reference: Reference, owner: str) -> str | None:
    """Why a user's task may not read the task output or artifact store URL ``reference`` names, or None."""
    if reference.kind is Kind.URL:
        return await _store_refusal(redis, roots, reference, owner)
    if await task_owner(redis, reference.value) == owner:
        return None
    # The same answer for another user's task and for none at all: nothing is learnt.
    return (
        f"{reference.field} names task {reference.value}, which is not one of your tasks; name one of your own "
        "tasks (GET /api/v1/tasks lists them)"
    )


async def _refusal(
    redis: aioredis.Redis, roots: ModelRoots, path: Path, reference: Reference, owner: str
) -> str | None:
    """:meth:`ModelRoots.refusal`, with the owner of the task whose result folder holds ``path`` (or of
    the uploaded file it is) read from Redis."""
    return roots.refusal(path, reference, await _folder_owner(redis, roots.parts(path)), owner)


async def _folder_owner(redis: aioredis.Redis, parts: tuple[str, ...]) -> str | None:
    """The owner of the task whose folder, or of the upload, ``parts`` (a path in the results dir's
    layout) is in."""
    task = _task_of(parts)
    if task is not None:
        return await task_owner(redis, task)
    upload = _upload_of(parts)
    return await openai_files.file_owner(redis, upload) if upload is not None else None


async def _store_refusal(redis: aioredis.Redis, roots: ModelRoots, reference: Reference, owner: str) -> str | None:
    """:meth:`ModelRoots.store_refusal`, with the owner of the task or upload whose store folder the URL is in."""
    return roots.store_refusal(reference, await _folder_owner(redis, roots.in_store(reference.value) or ()), owner)
