"""Downloading a task's Hugging Face model onto the worker, and what every download shares: the options
read from the worker's settings, the offline rule, the HTTP client, the choice of files (URLs: urls.py).

The hub is spoken to directly over HTTP (the two API calls ``snapshot_download`` makes, then each file
from ``/{repo}/resolve/{commit}/{path}``) rather than through ``huggingface_hub``: its downloads write
to a temporary file of a random name and delete it on failure, so a killed worker would start a 15 GB
download again from zero. Here every file resumes (see :mod:`mloc.llm.transfer`), downloads go into
the host's download cache (see :mod:`mloc.llm.downloads`), and LFS files are checked against their
SHA-256. ``HF_ENDPOINT`` points at a mirror; ``HF_TOKEN`` authenticates and is sent in a header only,
never written to a task's record or log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mloc.errors import ExecutionError
from mloc.llm.downloads import COMPLETE, Entry, Room, downloads_root, exclusive, hold, make_room
from mloc.llm.transfer import (
    CancelCheck,
    Progress,
    ProgressHook,
    format_bytes,
    http_download,
    part_bytes,
)
from mloc.spec.base import REPO_ID

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
REFS_FILE = ".refs.json"
# Files a model repo may carry that no engine here reads: other frameworks' weights and exports.
SKIPPED = ("*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.mlmodel", ".gitattributes",
           "onnx/*", "openvino/*", "coreml/*", "original/*", "flax_model*", "tf_model*", "rust_model*")  # fmt: skip
# Beside safetensors weights, the same weights in older formats are not fetched.
SKIPPED_BESIDE_SAFETENSORS = ("*.bin", "*.pt", "*.pth", "*.gguf")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FetchOptions:
    """How this worker downloads models, read from its settings and environment."""

    offline: bool = False
    max_bytes: int = 0
    min_free_bytes: int = 1 << 30
    hf_endpoint: str = DEFAULT_ENDPOINT
    hf_token: str | None = field(default=None, repr=False)
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> FetchOptions:
        from mloc.settings import get_settings

        settings = get_settings()
        offline = settings.offline
        if offline is None:
            offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
        try:
            storage = json.loads(settings.model_source_options) if settings.model_source_options.strip() else {}
        except ValueError as exc:
            raise ExecutionError(f"MLOC_MODEL_SOURCE_OPTIONS is not JSON ({exc}); write an object") from exc
        return cls(
            offline=offline,
            max_bytes=settings.model_downloads_max_bytes,
            min_free_bytes=settings.model_downloads_min_free_bytes,
            hf_endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            hf_token=_hf_token(),
            storage_options=storage if isinstance(storage, dict) else {},
        )


def _hf_token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN") or None
    return get_token()  # HF_TOKEN, else the token `hf auth login` saved


def offline_refusal(what: str) -> ExecutionError:
    return ExecutionError(
        f"model {what} is not on this worker, and the worker is offline (MLOC_OFFLINE=1, or HF_HUB_OFFLINE=1 "
        "without MLOC_OFFLINE=0) so it downloads nothing; set MLOC_OFFLINE=0 on the worker to let it download, "
        "or put the model in the local Hugging Face cache (HF_HUB_CACHE) or a local folder (source.type: local)"
    )


def http_client() -> httpx.Client:
    import httpx

    from mloc import __version__

    return httpx.Client(
        follow_redirects=True,  # httpx drops the Authorization header when a redirect leaves the host
        timeout=httpx.Timeout(60.0, connect=15.0),
        headers={"user-agent": f"mloc/{__version__}"},
    )


def safe_relative(path: str, source: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts:
        raise ExecutionError(f"model {source} lists a file {path!r} outside its folder; refusing to write it")
    return path


def choose_files(paths: list[str]) -> list[str]:
    """The files of a model folder worth fetching (see SKIPPED)."""
    wanted = [path for path in paths if not any(fnmatch(path, pattern) for pattern in SKIPPED)]
    if any(path.endswith(".safetensors") and "/" not in path for path in wanted):
        wanted = [path for path in wanted if not any(fnmatch(path, p) for p in SKIPPED_BESIDE_SAFETENSORS)]
    return wanted


# --- Hugging Face ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files only


def hub_entry(models_dir: Path, repo: str) -> Entry:
    return Entry(downloads_root(models_dir), "hf--" + repo.replace("/", "--"))


def _read_refs(entry: Entry) -> dict[str, str]:
    try:
        refs = json.loads((entry.path / REFS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return refs if isinstance(refs, dict) else {}


def _hub_error(response: httpx.Response, repo: str, revision: str, options: FetchOptions) -> ExecutionError:
    code = response.status_code
    where = f"model {repo!r} on {options.hf_endpoint}"
    token_hint = (
        "the token in HF_TOKEN was refused or has no access"
        if options.hf_token
        else "set HF_TOKEN in the worker's environment to a token with access"
    )
    if code == 401:
        return ExecutionError(f"{where} needs a Hugging Face token, or does not exist: {token_hint}")
    if code == 403:
        return ExecutionError(
            f"{where} refused the token in HF_TOKEN; if the model is gated, accept its terms on its hub page "
            "with the token's account"
        )
    if code == 404 and response.headers.get("x-error-code") == "RevisionNotFound":
        return ExecutionError(f"{where} has no revision {revision!r}; set source.revision to a branch, tag or commit")
    if code == 404:
        return ExecutionError(f"{where} was not found; check source.identifier (a private model: {token_hint})")
    return ExecutionError(f"{where}: the hub answered HTTP {code}; try again later or check HF_ENDPOINT")


def _hub_json(client: httpx.Client, url: str, repo: str, revision: str, options: FetchOptions) -> httpx.Response:
    import httpx

    try:
        response = client.get(url, headers=_auth(options))
    except httpx.TransportError as exc:
        problem = f"could not reach the hub at {options.hf_endpoint} ({type(exc).__name__}: {exc})"
        raise _Unreachable(f"{problem}; {_unreachable_fix(options)}") from exc
    if response.status_code >= 400:
        raise _hub_error(response, repo, revision, options)
    return response


def _unreachable_fix(options: FetchOptions) -> str:
    """What to do when the worker cannot reach the hub: the worker's network is rarely the task's to change."""
    if options.hf_endpoint == DEFAULT_ENDPOINT:
        endpoint = "set HF_ENDPOINT on the worker to a hub mirror it can reach"
    else:
        endpoint = "check that HF_ENDPOINT on the worker names a hub mirror it can reach"
    return (
        f"{endpoint}, put the model in the worker's Hugging Face cache (HF_HUB_CACHE), or use a copy on the "
        "worker: source.type local (a folder or .gguf file; for a user's task under MLOC_MODEL_ROOTS) or a "
        "packaged model (source.type package)"
    )


class _Unreachable(ExecutionError):
    """The hub could not be reached (a local copy may still serve)."""


def _auth(options: FetchOptions) -> dict[str, str]:
    return {"authorization": f"Bearer {options.hf_token}"} if options.hf_token else {}


def _hub_files(client: httpx.Client, repo: str, commit: str, options: FetchOptions) -> list[HubFile]:
    files: list[HubFile] = []
    url: str | None = f"{options.hf_endpoint}/api/models/{repo}/tree/{commit}?recursive=true&expand=false"
    while url:
        response = _hub_json(client, url, repo, commit, options)
        for item in response.json():
            if item.get("type") == "file":
                lfs = item.get("lfs") or {}
                path = safe_relative(str(item["path"]), repr(repo))
                files.append(HubFile(path, int(lfs.get("size") or item.get("size") or 0), lfs.get("oid")))
        url = response.links.get("next", {}).get("url")
    chosen = set(choose_files([file.path for file in files]))
    return [file for file in files if file.path in chosen]


def _check_sha256(path: Path, expected: str, source: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        path.unlink()
        raise ExecutionError(
            f"{source}: {path.name} does not match its SHA-256 from the hub; it was removed and the next try "
            "downloads it again"
        )


def fetch_hub(
    repo: str,
    revision: str | None,
    models_dir: Path,
    options: FetchOptions,
    *,
    on_progress: ProgressHook | None = None,
    check_cancelled: CancelCheck | None = None,
) -> Path:
    """The folder of ``repo`` at ``revision`` (default branch when None) in the download cache, downloaded
    first if this host lacks it. The entry is held in use by this process (see :mod:`mloc.llm.downloads`)."""
    if not REPO_ID.match(repo):
        raise ExecutionError(f"model {repo!r} is not a valid Hugging Face id (owner/name)")
    entry = hub_entry(models_dir, repo)
    hold(entry)
    rev = revision or "main"
    shown = f"{repo!r}" + (f" at revision {revision!r}" if revision else "")
    commit = rev if COMMIT.match(rev) else None
    with http_client() as client:
        if commit is None and not options.offline:
            try:
                response = _hub_json(client, f"{options.hf_endpoint}/api/models/{repo}/revision/{quote(rev, safe='')}",
                                     repo, rev, options)  # fmt: skip
                commit = str(response.json()["sha"])
            except _Unreachable:
                # The copy this host already holds serves while the hub is down.
                commit = _read_refs(entry).get(rev)
                if commit is None or not (entry.path / commit / COMPLETE).is_file():
                    raise
        if commit is None:
            commit = _read_refs(entry).get(rev)
        if commit is None:  # offline, and never fetched here
            raise offline_refusal(shown)
        folder = entry.path / commit
        if (folder / COMPLETE).is_file():
            _remember(entry, rev, commit, repo)
            return folder
        if options.offline:
            raise offline_refusal(shown)
        with exclusive(entry.download_lock):
            if not (folder / COMPLETE).is_file():
                _download_hub(client, repo, commit, entry, options, on_progress, check_cancelled)
        _remember(entry, rev, commit, repo)
    return folder


def _download_hub(
    client: httpx.Client,
    repo: str,
    commit: str,
    entry: Entry,
    options: FetchOptions,
    on_progress: ProgressHook | None,
    check_cancelled: CancelCheck | None,
) -> None:
    files = _hub_files(client, repo, commit, options)
    partial = entry.path / f".{commit}.partial"
    total = sum(file.size for file in files)
    present = sum(min(part_bytes(partial / file.path), file.size) for file in files)
    room = make_room(entry, total - present, max_bytes=options.max_bytes, min_free_bytes=options.min_free_bytes,
                     source=repr(repo))  # fmt: skip
    progress = Progress(repo, total, present, hook=on_progress, check_cancelled=check_cancelled)
    report_room(room, progress)
    for file in files:
        dest = partial / file.path
        if dest.is_file() and dest.stat().st_size == file.size:
            continue
        url = f"{options.hf_endpoint}/{repo}/resolve/{commit}/{quote(file.path)}"
        http_download(client, url, dest, progress=progress, headers=_auth(options), expected_size=file.size,
                      immutable=True)  # fmt: skip
        if file.sha256:
            _check_sha256(dest, file.sha256, repr(repo))
    (partial / COMPLETE).write_text(f"{repo}@{commit}\n", encoding="utf-8")
    folder = entry.path / commit
    if folder.exists():
        shutil.rmtree(folder)  # a folder without the marker: left by a crash mid-rename
    os.replace(partial, folder)
    progress.finished()


def report_room(room: Room, progress: Progress) -> None:
    if room.evicted:
        log.info("removed least recently used downloads to make room: %s", ", ".join(room.evicted))
    if room.over_budget:
        message = (
            f"the download cache will be {format_bytes(room.over_budget)} over MLOC_MODEL_DOWNLOADS_MAX_BYTES: "
            "the models that would make room are in use"
        )
        log.warning(message)
        if progress.hook is not None:
            progress.hook(progress.done, progress.total, message)


def _remember(entry: Entry, revision: str, commit: str, repo: str) -> None:
    """Record which commit a branch or tag named, so an offline worker or a down hub still finds it."""
    refs = _read_refs(entry)
    if refs.get(revision) != commit:
        refs[revision] = commit
        tmp = entry.path / f"{REFS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(refs), encoding="utf-8")
        os.replace(tmp, entry.path / REFS_FILE)
    entry.mark("huggingface", repo)
