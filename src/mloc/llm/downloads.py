"""The downloaded-model cache of one host: where each download lives, who uses it, and what goes when
room is needed.

Everything a worker downloads (hub repos, https and s3 models) lives under ``<models dir>/downloads``,
one entry folder per source, so that one budget and one eviction rule cover it all; the admin's own
Hugging Face cache is read, never evicted. Each entry has two lock files under ``.locks``:

- ``<entry>.download``: held exclusively while a process fetches into the entry, so the processes of a
  host that want the same model download it once; the others wait, then find it there.
- ``<entry>.use``: held shared by every process that uses the entry (from before its download until
  the process ends or releases it); eviction takes it exclusively without waiting, so an entry in use
  is skipped, never removed under a reader. Its modification time records the last use, for LRU.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mloc.errors import ExecutionError
from mloc.llm.transfer import format_bytes

DOWNLOADS_DIR = "downloads"
LOCKS_DIR = ".locks"
ENTRY_FILE = ".mloc-entry.json"  # written once the entry holds a complete download: kind and source
COMPLETE = ".mloc-complete"  # in a hub entry's commit folder once all its files are there


@dataclass(frozen=True)
class Entry:
    """One source's folder in the download cache."""

    root: Path  # <models dir>/downloads
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def download_lock(self) -> Path:
        return self.root / LOCKS_DIR / f"{self.name}.download"

    @property
    def use_lock(self) -> Path:
        return self.root / LOCKS_DIR / f"{self.name}.use"

    def mark(self, kind: str, source: str) -> None:
        """Record what the entry holds, for :func:`held_models`."""
        (self.path / ENTRY_FILE).write_text(json.dumps({"kind": kind, "source": source}), encoding="utf-8")


def downloads_root(models_dir: Path) -> Path:
    return models_dir / DOWNLOADS_DIR


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (and threads), held while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The use locks this process holds, by entry folder. flock locks belong to the open file, so one
# handle per entry is kept for as long as the process uses the entry.
_held: dict[Path, IO[str]] = {}
_held_guard = threading.Lock()


def hold(entry: Entry) -> None:
    """Mark ``entry`` in use by this process (waiting while an eviction of it finishes) and record the use."""
    with _held_guard:
        if entry.path not in _held:
            entry.use_lock.parent.mkdir(parents=True, exist_ok=True)
            handle = entry.use_lock.open("a")
            fcntl.flock(handle, fcntl.LOCK_SH)
            _held[entry.path] = handle
    os.utime(entry.use_lock)


def release(path: Path) -> bool:
    """Stop using the entry whose folder holds ``path``; it may then be evicted. False if none was held."""
    with _held_guard:
        for folder in list(_held):
            if path == folder or path.is_relative_to(folder):
                handle = _held.pop(folder)
                handle.close()  # closing the file drops its lock
                return True
    return False


def release_all() -> None:
    """Stop using every entry this process holds."""
    with _held_guard:
        for handle in _held.values():
            handle.close()
        _held.clear()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _entries(root: Path) -> list[Entry]:
    if not root.is_dir():
        return []
    return [Entry(root, item.name) for item in root.iterdir() if item.is_dir() and not item.name.startswith(".")]


def _last_use(entry: Entry) -> float:
    try:
        return entry.use_lock.stat().st_mtime
    except OSError:
        return 0.0


def _evict(entry: Entry) -> bool:
    """Remove ``entry`` unless some process uses it; True if it was removed."""
    entry.use_lock.parent.mkdir(parents=True, exist_ok=True)
    with entry.use_lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return not entry.path.exists()


@dataclass(frozen=True)
class Room:
    """What making room for a download found: bytes evicted, and the budget it could not keep."""

    evicted: list[str]
    over_budget: int  # bytes beyond the budget after the download, held by entries in use


def make_room(entry: Entry, needed: int, *, max_bytes: int, min_free_bytes: int, source: str) -> Room:
    """Evict least recently used entries (never ``entry``, never one in use) until ``needed`` more bytes
    keep the cache within ``max_bytes`` (0: no budget) and leave ``min_free_bytes`` free on the disk.

    Raises :class:`ExecutionError` when the disk cannot take the download even so, or the download alone
    is larger than the budget. A budget that entries in use keep exceeded is reported, not enforced: a
    task is not failed because another task's model is loaded."""
    root = entry.root
    root.mkdir(parents=True, exist_ok=True)
    if max_bytes and needed > max_bytes:
        raise ExecutionError(
            f"model {source} needs {_size(needed)} but the download cache budget MLOC_MODEL_DOWNLOADS_MAX_BYTES "
            f"is {max_bytes} bytes; raise it, or set it to 0 for no budget"
        )
    evicted: list[str] = []
    with exclusive(root / LOCKS_DIR / "evict"):
        others = sorted((e for e in _entries(root) if e.name != entry.name), key=_last_use)
        sizes = {e.name: tree_bytes(e.path) for e in others}
        used = sum(sizes.values()) + tree_bytes(entry.path)

        for other in others:
            over = bool(max_bytes) and used + needed > max_bytes
            short = shutil.disk_usage(root).free - needed < min_free_bytes
            if not (over or short):
                break
            if _evict(other):
                evicted.append(other.name)
                used -= sizes[other.name]
        available = shutil.disk_usage(root).free
        if available - needed < min_free_bytes:
            raise ExecutionError(
                f"model {source} needs {_size(needed)} more on disk but {root} has {_size(available)} free, and "
                f"downloads leave MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES={min_free_bytes} free (models in use are "
                "never removed); "
                "free some space, lower MLOC_MODEL_DOWNLOADS_MIN_FREE_BYTES, or set MLOC_MODELS_DIR on a larger disk"
            )
    over_budget = max(0, used + needed - max_bytes) if max_bytes else 0
    return Room(evicted, over_budget)


def _size(count: int) -> str:
    return f"{format_bytes(count)} ({count} bytes)"


def _read_entry(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def held_models(models_dir: Path, *, hf_cache: Path | None = None) -> list[str]:
    """The hub ids and URLs whose files this host holds, ready to use without a download: those in its
    download cache, and (given ``hf_cache``) the repos of a Hugging Face cache. Only folder listings and
    tiny files are read, so a worker can call it at every heartbeat."""
    found: set[str] = set()
    for entry in _entries(downloads_root(models_dir)):
        data = _read_entry(entry.path)
        if data is None or not isinstance(data.get("source"), str):
            continue
        complete = ((child / COMPLETE).is_file() for child in entry.path.iterdir() if child.is_dir())
        if data.get("kind") == "huggingface" and not any(complete):
            continue
        found.add(data["source"])
    if hf_cache is not None and hf_cache.is_dir():
        for repo in hf_cache.glob("models--*"):
            snapshots = repo / "snapshots"
            if snapshots.is_dir() and any(snapshots.iterdir()):
                found.add(repo.name.removeprefix("models--").replace("--", "/"))
    return sorted(found)
