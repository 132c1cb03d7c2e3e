"""Which lm-eval harness tasks this worker holds the data of, advertised with its eval executor: an
eval task naming a harness task whose data no worker holds is refused at submit, not at start.

Workers never download, so a harness task runs where ``datasets`` finds a build of its dataset offline,
in the dataset cache (``HF_DATASETS_CACHE``: ``<namespace>___<name>/<config>/<version>/<hash>/``, the
layout ``datasets`` reads back without network), or where its ``dataset_path`` is a local folder. Which
dataset each task reads comes from lm-eval's task index; building it takes seconds, so it is built only
when the cache holds any dataset, and kept in ``MLOC_HOME/cache`` per lm-eval version. A group or tag
counts when every task in it does. The caches of ``datasets``' file builders (json, csv...: what custom
eval tasks and local files leave) name no hub dataset and are passed over, as are the few harness tasks
that read files through those builders. ``MLOC_EVAL_HARNESS_TASKS`` adds names the admin knows are
present (those, and tasks defined in Python, whose dataset the index does not show).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# A catalogue entry: {"data": [[path, config or None], ...]} for a task, {"members": [...]} for a group or tag.
Catalogue = dict[str, dict[str, list[Any]]]
# The builders ``datasets`` ships: their cache folders hold local or downloaded files, not a hub dataset.
FILE_BUILDERS = frozenset(
    {
        "arrow", "audiofolder", "cache", "csv", "eval", "generator", "hdf5", "imagefolder", "json", "niftifolder",
        "pandas", "parquet", "pdffolder", "spark", "sql", "text", "videofolder", "webdataset", "xml",
    }
)  # fmt: skip
_UPPER_UPPER = re.compile(r"([A-Z]+)([A-Z][a-z])")
_LOWER_UPPER = re.compile(r"([a-z\d])([A-Z])")


def datasets_cache() -> Path:
    """The dataset cache ``datasets`` reads (HF_DATASETS_CACHE, else HF_HOME/datasets), without importing it."""
    explicit = os.environ.get("HF_DATASETS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def cached_builds(cache: Path) -> set[str]:
    """``<folder>/<config>`` of every dataset the cache holds a build of (a ``<version>/<hash>`` folder)."""
    found: set[str] = set()
    if not cache.is_dir():
        return found
    for dataset in cache.iterdir():
        skipped = dataset.name in FILE_BUILDERS or dataset.name in ("downloads", "modules")
        if skipped or not dataset.is_dir() or dataset.name.startswith((".", "_")):
            continue
        for config in dataset.iterdir():
            if config.is_dir() and any(build.is_dir() for build in config.glob("*/*")):
                found.add(f"{dataset.name}/{config.name}")
    return found


def cache_folder(dataset_path: str) -> str:
    """The cache folder ``datasets`` keeps a hub dataset's builds in ('Rowan/hellaswag' -> 'Rowan___hellaswag')."""
    parts = dataset_path.split("/")
    name = _LOWER_UPPER.sub(r"\1_\2", _UPPER_UPPER.sub(r"\1_\2", parts[-1])).lower()
    return "___".join([*parts[:-1], name])


def has_data(dataset_path: str, config: str | None, builds: set[str]) -> bool:
    if dataset_path in FILE_BUILDERS:
        return False
    if dataset_path.startswith(("/", "~")):
        return Path(dataset_path).expanduser().is_dir()
    folder = cache_folder(dataset_path)
    if config:
        return f"{folder}/{config}" in builds
    return any(build.startswith(folder + "/") for build in builds)


def available(catalogue: Catalogue, builds: set[str]) -> list[str]:
    """The catalogue's tasks, groups and tags whose data the builds hold."""
    known: dict[str, bool] = {}

    def ok(name: str, seen: frozenset[str]) -> bool:
        if name in known:
            return known[name]
        entry = catalogue.get(name)
        if entry is None or name in seen:
            return False
        if "data" in entry:
            result = bool(entry["data"]) and all(has_data(path, config, builds) for path, config in entry["data"])
        else:
            members = entry.get("members") or []
            result = bool(members) and all(ok(member, seen | {name}) for member in members)
        known[name] = result
        return result

    return sorted(name for name in catalogue if ok(name, frozenset()))


def build_catalogue() -> Catalogue:
    """Every lm-eval task, group and tag with the datasets it reads (from lm-eval's task index)."""
    from lm_eval.tasks import TaskManager

    catalogue: Catalogue = {}
    for name, entry in TaskManager().task_index.items():
        kind = getattr(entry.kind, "name", "")
        config = entry.cfg or {}
        if kind == "TASK" and config.get("dataset_path"):
            catalogue[name] = {"data": [[str(config["dataset_path"]), config.get("dataset_name")]]}
        elif kind == "GROUP":
            catalogue[name] = {"members": list(_members(config.get("task") or []))}
        elif kind == "TAG":
            catalogue[name] = {"members": sorted(entry.tags)}
    return catalogue


def _members(tasks: Iterable[Any]) -> Iterable[str]:
    for task in tasks:
        if isinstance(task, str):
            yield task
        elif isinstance(task, dict) and isinstance(task.get("task"), str):
            yield task["task"]


def catalogue(home: Path) -> Catalogue:
    """lm-eval's catalogue, read from ``home/cache`` when this lm-eval version's is there, else built and kept."""
    version = metadata.version("lm_eval")
    path = home / "cache" / f"lm-eval-{version}-tasks.json"
    try:
        found: Catalogue = json.loads(path.read_text())
        return found
    except (OSError, ValueError):
        pass
    built = build_catalogue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(built))
        temporary.replace(path)
    except OSError as exc:
        log.warning("lm-eval's task list could not be kept in %s (%s); it is built again next time", path, exc)
    return built


def harness_tasks() -> list[str]:
    """The harness tasks (and groups, tags) this worker holds the data of, for its capabilities."""
    from mloc.settings import Settings

    settings = Settings()
    declared = [name.strip() for name in settings.eval_harness_tasks.split(",") if name.strip()]
    builds = cached_builds(datasets_cache())
    if not builds:
        return sorted(set(declared))
    try:
        found = available(catalogue(settings.home), builds)
    except Exception as exc:  # a broken lm-eval install must not keep the worker from registering
        log.warning("could not list the harness tasks whose data is cached (%s: %s)", type(exc).__name__, exc)
        found = []
    return sorted(set(found) | set(declared))
