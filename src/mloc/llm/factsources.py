"""Which model a task's facts belong to, and the facts of the models a host holds.

Admission sizes a task from its model's facts (:class:`~mloc.llm.modelfacts.ModelFacts`) without the
weights. A worker publishes the facts of every model its disk holds (its download cache, the admin's
Hugging Face cache, the packaged models it has built), keyed by :func:`facts_key`, so the orchestrator
finds them without reaching the hub. Reading a GGUF header takes a moment, so each file's facts are
kept for as long as the file is unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mloc.llm.downloads import COMPLETE, ENTRY_FILE, downloads_root
from mloc.llm.modelfacts import ModelFactsError, model_facts
from mloc.llm.modelsource import CONVERTED_DIR, MARKER, PACKAGED_MODELS, find_packaged
from mloc.spec.base import ModelSource, SourceType

log = logging.getLogger(__name__)
PACKAGE_PREFIX = "package:"
# A worker publishes the facts of at most this many models (the newest first): a few hundred bytes each.
MAX_PUBLISHED = 64

_read: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}
_read_guard = threading.Lock()


def facts_key(source: ModelSource) -> str | None:
    """The name a model's facts go by: a hub id or URL as ``held_models`` lists them, ``package:NAME``
    for a packaged model; None for a local path, which only the host that has it can read."""
    if source.type == SourceType.PACKAGE:
        packaged = find_packaged(source.identifier)
        return f"{PACKAGE_PREFIX}{packaged.name}" if packaged else None
    if source.type == SourceType.LOCAL:
        return None
    return source.identifier


def held_model_facts(models_dir: Path, *, hf_cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """The facts of the models this host holds, by :func:`facts_key`, as :meth:`ModelFacts.to_wire`
    gives them; a model whose config cannot be read is left out (its tasks fall back to the user's
    numbers, with the reason on the task)."""
    found: dict[str, dict[str, Any]] = {}
    for key, path in sorted(_held(models_dir, hf_cache), key=lambda pair: -_mtime(pair[1])):
        if key in found or len(found) >= MAX_PUBLISHED:
            continue
        facts = _facts_of(path)
        if facts is not None:
            found[key] = facts
    return found


def _held(models_dir: Path, hf_cache: Path | None) -> Iterator[tuple[str, Path]]:
    """(key, model folder or .gguf) for each model on this host's disk."""
    root = downloads_root(models_dir)
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            data = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not complete yet
        source = data.get("source") if isinstance(data, dict) else None
        if not isinstance(source, str):
            continue
        if data.get("kind") == "huggingface":
            commits = [c for c in entry.iterdir() if c.is_dir() and (c / COMPLETE).is_file()]
            if commits:
                yield source, max(commits, key=_mtime)
        else:
            ggufs = sorted(entry.glob("*.gguf"))
            if ggufs:
                yield source, ggufs[0]
            elif (entry / "model" / "config.json").is_file():
                yield source, entry / "model"
    for packaged in PACKAGED_MODELS:
        folder = models_dir / CONVERTED_DIR / packaged.name
        if (folder / MARKER).is_file():
            yield f"{PACKAGE_PREFIX}{packaged.name}", folder
    if hf_cache is not None and hf_cache.is_dir():
        for repo in hf_cache.glob("models--*"):
            snapshots = [s for s in (repo / "snapshots").glob("*") if (s / "config.json").is_file()]
            if snapshots:
                yield repo.name.removeprefix("models--").replace("--", "/"), max(snapshots, key=_mtime)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _facts_of(path: Path) -> dict[str, Any] | None:
    read_from = path if path.suffix == ".gguf" else path / "config.json"
    try:
        stat = read_from.stat()
    except OSError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _read_guard:
        known = _read.get(read_from)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        facts: dict[str, Any] | None = model_facts(path).to_wire()
    except ModelFactsError as exc:
        log.info("model facts not published: %s", exc.message)
        facts = None
    with _read_guard:
        _read[read_from] = (stamp, facts)
    return facts
