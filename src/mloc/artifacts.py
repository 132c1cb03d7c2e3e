"""Where a task's result files live so that any host can read them.

By default they stay where the worker wrote them, ``RESULTS_DIR/<task_id>/``, and the orchestrator can
serve them only when it shares that folder. With ``MLOC_ARTIFACT_STORE`` set (an fsspec URL:
``file:///shared/mloc``, ``s3://bucket/prefix``, ``memory://`` ...) the worker publishes the folder
there before it reports success, and the orchestrator serves it from there. Layout in a store::

    <root>/<task_id>/<attempt>/files/<path>        the task's folder as the executor left it
    <root>/<task_id>/<attempt>/manifest.json       written last: {"task_id", "attempt", "worker_id", "files"}
    <root>/files/<file id>.rows.jsonl              a batch's rows (OpenAI Batch API), for workers on any host

A manifest exists only once every file is in place (it is written under a temporary name and moved),
so a reader never sees half a set. The attempt in the path fences a worker that was declared lost but
kept running: its upload lands under its own attempt, which the task record does not name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mloc.errors import BadRequest, ConfigError, ExecutionError, NotFound
from mloc.openai_files import FILES_DIR as UPLOADS_DIR
from mloc.settings import Settings, parse_store_options

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
CHUNK = 1 << 20


class ArtifactUploadError(ExecutionError):
    """The task's files could not be published; the task fails with this message."""


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the task's folder, with "/" separators
    size: int


@dataclass(frozen=True)
class Listing:
    """The files a task left, and where they are read from."""

    task_id: str
    source: str  # "store" or "results_dir"
    attempt: int | None
    items: list[Artifact]

    def find(self, path: str) -> Artifact:
        for item in self.items:
            if item.path == path:
                return item
        raise NotFound(
            f"task {self.task_id} has no artifact {path!r}; GET /api/v1/tasks/{self.task_id}/artifacts lists them"
        )


def check_path(path: str) -> str:
    """A relative artifact path, or BadRequest: no absolute paths, '..', backslashes or empty parts."""
    parts = path.split("/")
    if (
        not path
        or len(path) > 4096
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise BadRequest(
            f"artifact path {path[:200]!r} is not allowed; give a path relative to the task's folder as the "
            "artifact list shows it (no leading '/', no '..')"
        )
    return path


def _local_files(folder: Path) -> list[tuple[Path, Artifact]]:
    """Regular files under ``folder``; symbolic links are left out so nothing outside it is published."""
    found: list[tuple[Path, Artifact]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                continue
            relative = full.relative_to(folder).as_posix()
            found.append((full, Artifact(relative, full.stat().st_size)))
    return found


class ArtifactStore:
    """A task-artifact store behind an fsspec URL."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        except ImportError as exc:
            protocol = url.split("://", 1)[0]
            extra = " (pip install 'mloc[s3]')" if protocol in ("s3", "s3a") else ""
            raise ConfigError(
                f"MLOC_ARTIFACT_STORE is {url!r}, but the {protocol}:// file system is not installed: {exc}{extra}"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"MLOC_ARTIFACT_STORE {url!r} cannot be opened: {exc}; use file:///shared/folder, "
                "s3://bucket/prefix (pip install 'mloc[s3]') or another fsspec URL"
            ) from exc
        self.root = root.rstrip("/")

    def _attempt_dir(self, task_id: str, attempt: int) -> str:
        return f"{self.root}/{task_id}/{attempt}"

    # ------------------------------------------------------------------ worker
    def publish(self, task_id: str, attempt: int, worker_id: str, folder: Path) -> list[Artifact]:
        """Upload ``folder`` for this attempt, then its manifest; raises ArtifactUploadError on failure."""
        base = self._attempt_dir(task_id, attempt)
        started = time.monotonic()
        try:
            files = _local_files(folder) if folder.is_dir() else []
            if self.fs.exists(base):  # leftovers of an interrupted upload of this same attempt
                self.fs.rm(base, recursive=True)
            for local, item in files:
                remote = f"{base}/files/{item.path}"
                self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
                self.fs.put_file(str(local), remote)
            manifest = {
                "task_id": task_id,
                "attempt": attempt,
                "worker_id": worker_id,
                "created_at": time.time(),
                "files": [asdict(item) for _, item in files],
            }
            temporary = f"{base}/.{MANIFEST}.{uuid.uuid4().hex}"
            self.fs.pipe_file(temporary, json.dumps(manifest).encode())
            self.fs.mv(temporary, f"{base}/{MANIFEST}")
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactUploadError(
                f"could not publish the results of task {task_id} to the artifact store {self.url}: "
                f"{type(exc).__name__}: {exc}; check MLOC_ARTIFACT_STORE, its credentials and free space"
            ) from exc
        log.info(
            "task %s: published %d file(s) to %s in %.2fs", task_id, len(files), self.url, time.monotonic() - started
        )
        return [item for _, item in files]

    # ------------------------------------------------------------ batch uploads
    def upload_url(self, name: str) -> str:
        """The URL a task names a batch's rows file by, once :meth:`put_upload` has put it in the store."""
        return f"{self.url.rstrip('/')}/{UPLOADS_DIR}/{name}"

    def put_upload(self, local: Path, name: str) -> str:
        """Copy a batch's rows file into the store (whole or not at all: written aside, then moved), so
        workers on any host read it; its URL."""
        folder = f"{self.root}/{UPLOADS_DIR}"
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}"
        self.fs.makedirs(folder, exist_ok=True)
        self.fs.put_file(str(local), temporary)
        self.fs.mv(temporary, f"{folder}/{name}")
        return self.upload_url(name)

    def remove_upload(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.root}/{UPLOADS_DIR}/{name}")

    def open_url(self, url: str) -> IO[bytes] | None:
        """Open ``url`` when it is in this store (with the store's own settings and credentials), else None."""
        prefix = self.url.rstrip("/") + "/"
        if not url.startswith(prefix):
            return None
        return self.fs.open(f"{self.root}/{url[len(prefix) :]}", "rb")

    # ------------------------------------------------------------ orchestrator
    def listing(self, task_id: str, attempt: int) -> Listing | None:
        """The manifest of one attempt, or None when that attempt published nothing (yet)."""
        try:
            raw = self.fs.cat_file(f"{self._attempt_dir(task_id, attempt)}/{MANIFEST}")
        except FileNotFoundError:
            return None
        data = json.loads(raw)
        items = [Artifact(str(f["path"]), int(f["size"])) for f in data.get("files", [])]
        return Listing(task_id, "store", attempt, items)

    def open(self, task_id: str, attempt: int, path: str) -> IO[bytes]:
        return self.fs.open(f"{self._attempt_dir(task_id, attempt)}/files/{check_path(path)}", "rb")

    # --------------------------------------------------------------- retention
    def remove_task(self, task_id: str) -> bool:
        """Remove everything stored for a task, every attempt; whether anything was there. Nothing there
        is no error, so removing twice (two orchestrators, a reap that retries) is harmless. Errors
        reaching the store are raised. Only a task id names a folder here: ``files/`` (batch rows) and
        anything else under the root are never touched."""
        if not is_task_id(task_id):
            raise ValueError(f"{task_id[:200]!r} is not a task id; only a task's own folder is removed from the store")
        folder = f"{self.root}/{task_id}"
        for _ in range(3):
            try:
                self.fs.rm(folder, recursive=True)
                return True
            except FileNotFoundError:
                # Gone, or going under another remover's hands: a file it took mid-way ends this one's walk.
                if not self.fs.exists(folder):
                    return False
        self.fs.rm(folder, recursive=True)
        return True


def is_task_id(name: str) -> bool:
    """Whether ``name`` is a task id as MLOC makes them: a UUID in its canonical form."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _options(settings: Settings) -> dict[str, Any]:
    if not settings.artifact_store_options.strip():
        return {}
    return parse_store_options(settings.artifact_store_options)


@functools.lru_cache(maxsize=8)
def _store(url: str, options: str) -> ArtifactStore:
    return ArtifactStore(url, json.loads(options) if options else None)


def store_for(settings: Settings) -> ArtifactStore | None:
    """The configured store, or None when results stay in RESULTS_DIR."""
    if not settings.artifact_store_url:
        return None
    return _store(settings.artifact_store_url, json.dumps(_options(settings), sort_keys=True))


async def publish(settings: Settings, task_id: str, attempt: int, worker_id: str, folder: Path) -> None:
    """Worker side: publish a finished task's folder when a store is configured (off the event loop)."""
    try:
        store = store_for(settings)
    except ConfigError as exc:
        raise ArtifactUploadError(exc.message) from exc
    if store is not None:
        await asyncio.to_thread(store.publish, task_id, attempt, worker_id, folder)


# ---------------------------------------------------------------- local folder
def _local_listing(settings: Settings, task_id: str) -> Listing | None:
    folder = settings.results_dir / task_id
    if not folder.is_dir():
        return None
    return Listing(task_id, "results_dir", None, [item for _, item in _local_files(folder)])


def _open_local(settings: Settings, task_id: str, path: str) -> IO[bytes]:
    folder = (settings.results_dir / task_id).resolve()
    target = (folder / check_path(path)).resolve()
    if not target.is_relative_to(folder) or not target.is_file():
        raise NotFound(f"task {task_id} has no artifact {path!r}")
    return open(target, "rb")


def listing(settings: Settings, task_id: str, state: str, attempt: int, worker_id: str | None) -> Listing:
    """Orchestrator side: the files of a task, from the store (the attempt that counts) or RESULTS_DIR."""
    store = store_for(settings)
    if store is not None:
        found = store.listing(task_id, attempt) if attempt else None
        if found is not None:
            return found
        # Succeeded with nothing published: its worker runs without the store and wrote its files to its
        # RESULTS_DIR, found here when that folder is shared with (or on the host of) this orchestrator.
        succeeded = state == "succeeded"
        local = _local_listing(settings, task_id) if succeeded else None
        if local is not None:
            return local
        by = (
            f"; worker {worker_id} may run without MLOC_ARTIFACT_STORE: set it on every worker"
            if succeeded and worker_id
            else ""
        )
        raise NotFound(
            f"task {task_id} has no published artifacts (it is {state}); files are published to the artifact "
            f"store when a task succeeds{by}"
        )
    local = _local_listing(settings, task_id)
    if local is None and not worker_id:
        # Written here, by this orchestrator (a dataset task's joined lines, a replica group's merge).
        raise NotFound(
            f"task {task_id} has no files in this orchestrator's RESULTS_DIR ({settings.results_dir}), where they "
            "were written: its folder was deleted there, or RESULTS_DIR has changed since"
        )
    if local is None:
        raise NotFound(
            f"task {task_id} has no files in this orchestrator's RESULTS_DIR ({settings.results_dir}); they are on "
            f"worker {worker_id}'s disk in its RESULTS_DIR. Set MLOC_ARTIFACT_STORE (e.g. s3://bucket/mloc or a "
            "shared file:// folder) on workers and orchestrator to serve them from any host"
        )
    return local


def open_artifact(settings: Settings, found: Listing, path: str) -> IO[bytes]:
    """Open one listed file for reading; the path must be one the listing names."""
    found.find(check_path(path))
    store = store_for(settings)
    if store is not None and found.source == "store" and found.attempt is not None:
        return store.open(found.task_id, found.attempt, path)
    return _open_local(settings, found.task_id, path)


def chunks(handle: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """Read ``handle`` in pieces and close it at the end."""
    with handle:
        while block := handle.read(size):
            yield block
