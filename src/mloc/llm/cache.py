"""Loaded engines kept warm between tasks, least-recently-used first out, within a memory budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mloc.llm import downloads
from mloc.llm.base import LLMEngine

DEFAULT_RAM_FRACTION = 0.5


def total_ram_bytes() -> int:
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_ram_bytes() -> int:
    """RAM a new model can take now (MemAvailable: free plus reclaimable page cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return total_ram_bytes()


@dataclass
class _Entry:
    engine: LLMEngine
    size: int
    # How the engine was built (the loader's plan), for matching later tasks against it.
    detail: object = None


class EngineCache:
    """Engines by key ("vllm:<model>|<options>"); ``budget_bytes`` bounds the sum of their sizes.

    A model bigger than the whole budget is still admitted, alone: a worker must be able to run the
    task it accepted, and the budget's job is only to decide what stays warm.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes if budget_bytes is not None else int(total_ram_bytes() * DEFAULT_RAM_FRACTION)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0
        self.evictions: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def lru_keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def engines(self) -> list[LLMEngine]:
        return [entry.engine for entry in self._entries.values()]

    def warm_models(self) -> list[str]:
        """``engine:model`` of each loaded model, as a worker reports them to the scheduler."""
        return list(dict.fromkeys(f"{engine.name}:{engine.model_id}" for engine in self.engines()))

    def get(self, key: str) -> LLMEngine | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.engine

    def find(self, accepts: Callable[[object], bool]) -> LLMEngine | None:
        """The most recently used engine whose load detail ``accepts``, now marked used; None if none."""
        with self._lock:
            for key in reversed(self._entries):
                if accepts(self._entries[key].detail):
                    return self.get(key)
            return None

    def evict(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.evictions.append(key)
                entry.engine.close()
                self._release_files(entry)

    def _release_files(self, entry: _Entry) -> None:
        """Let the model cache evict a downloaded model's files once no warm engine here reads them: the
        executor process lives on after the engine, and its use lock would otherwise pin them."""
        path = getattr(entry.detail, "path", None)
        if not isinstance(path, Path):
            return
        if any(getattr(other.detail, "path", None) == path for other in self._entries.values()):
            return
        downloads.release(path)

    def make_room(self, size: int, *, keep: Callable[[str], bool] = lambda key: False) -> None:
        """Evict least-recently-used engines until ``size`` more bytes fit the budget."""
        with self._lock:
            for key in list(self._entries):
                if self.used_bytes + size <= self.budget_bytes:
                    break
                if not keep(key):
                    self.evict(key)

    def load(self, key: str, size: int, factory: Callable[[], LLMEngine], *, detail: object = None) -> LLMEngine:
        """The engine under ``key``, built by ``factory`` (after making room for ``size``) if absent;
        ``detail`` is kept beside it for :meth:`find`."""
        with self._lock:
            engine = self.get(key)
            if engine is not None:
                return engine
            self.make_room(size)
            engine = factory()
            self.loads += 1
            self._entries[key] = _Entry(engine, max(size, engine.memory_bytes), detail)
            return engine

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self.evict(key)


_shared: EngineCache | None = None
_sharing = False


def share_between_executors() -> None:
    """Make the executors of this process draw from one engine cache.

    The executor process turns this on: its inference, RAG and agent executors then reuse each other's
    warm models (a RAG task after an inference task on the same model loads nothing) and share one
    memory budget. Elsewhere (tests, benchmarks) each executor keeps its own cache.
    """
    global _sharing
    _sharing = True


def cache_for_executor(budget_bytes: int | None = None) -> EngineCache:
    """The engine cache a new executor uses: the process's shared one where sharing is on and no budget
    of its own is asked for, else a new one (budget: ``budget_bytes``, MLOC_MODEL_CACHE_BYTES, or half
    the RAM)."""
    global _shared
    from mloc.settings import get_settings

    if budget_bytes is None:
        budget_bytes = get_settings().model_cache_bytes
        if _sharing:
            if _shared is None:
                _shared = EngineCache(budget_bytes)
            return _shared
    return EngineCache(budget_bytes)
