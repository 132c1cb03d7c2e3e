"""Models named by URL: one ``.gguf`` file over https, or an s3 object (a ``.gguf``) or prefix (a model
folder), fetched into the host's download cache with resumable transfers (see :mod:`mloc.llm.fetch`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mloc.errors import ExecutionError
from mloc.llm.downloads import COMPLETE, Entry, downloads_root, exclusive, hold, make_room
from mloc.llm.fetch import FetchOptions, choose_files, http_client, offline_refusal, report_room, safe_relative
from mloc.llm.transfer import CancelCheck, Progress, ProgressHook, fs_download, http_download, part_bytes

if TYPE_CHECKING:
    import httpx


def url_entry(models_dir: Path, url: str) -> Entry:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(urlparse(url).path).name)[:64] or "model"
    return Entry(downloads_root(models_dir), f"url--{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")


def fetch_url(
    url: str,
    models_dir: Path,
    options: FetchOptions,
    *,
    on_progress: ProgressHook | None = None,
    check_cancelled: CancelCheck | None = None,
) -> Path:
    """A ``.gguf`` file (https or s3) or an HF model folder (s3 prefix) fetched into the download cache."""
    entry = url_entry(models_dir, url)
    hold(entry)
    if url.lower().startswith("s3://"):
        return _fetch_fs(url, entry, options, on_progress, check_cancelled)
    name = PurePosixPath(urlparse(url).path).name
    if not name.lower().endswith(".gguf"):
        raise ExecutionError(
            f"model URL {_plain(url)} does not name a .gguf file; an https source is one GGUF file (for a "
            "model folder use s3://bucket/prefix or a Hugging Face id)"
        )
    dest = entry.path / name
    if dest.is_file():
        return dest
    if options.offline:
        raise offline_refusal(_plain(url))
    with exclusive(entry.download_lock), http_client() as client:
        if dest.is_file():
            return dest
        size = _announced_size(client, url)
        have = part_bytes(dest)
        room = make_room(entry, max(0, (size or 0) - have), max_bytes=options.max_bytes,
                         min_free_bytes=options.min_free_bytes, source=_plain(url))  # fmt: skip
        progress = Progress(name, size or 0, have, hook=on_progress, check_cancelled=check_cancelled)
        report_room(room, progress)
        http_download(client, url, dest, progress=progress, expected_size=size)
        entry.mark("url", url)
        progress.finished()
    return dest


def _announced_size(client: httpx.Client, url: str) -> int | None:
    import httpx

    try:
        response = client.head(url)
    except httpx.TransportError as exc:
        raise ExecutionError(
            f"could not reach {_plain(url)} ({type(exc).__name__}: {exc}); check that the URL is right and "
            "reachable from the worker, or download the file onto the worker and use source.type local (for a "
            "user's task under MLOC_MODEL_ROOTS)"
        ) from exc
    if response.status_code in (401, 403, 404):
        raise ExecutionError(f"model URL {_plain(url)} answered HTTP {response.status_code}; check the URL")
    length = response.headers.get("content-length")
    return int(length) if response.status_code < 300 and length and length.isdigit() else None


def _plain(url: str) -> str:
    return url.split("?", 1)[0]


def _fetch_fs(
    url: str, entry: Entry, options: FetchOptions, on_progress: ProgressHook | None, check_cancelled: CancelCheck | None
) -> Path:
    name = PurePosixPath(urlparse(url).path).name
    single = url.lower().endswith(".gguf")
    target = entry.path / (name if single else "model")
    if (target / COMPLETE).is_file() or (single and target.is_file()):
        return target
    if options.offline:
        raise offline_refusal(url)
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **options.storage_options)
    except ImportError as exc:
        raise ExecutionError(f"model {url} needs s3fs on the worker: pip install 'mloc[s3]'") from exc
    with exclusive(entry.download_lock):
        if (target / COMPLETE).is_file() or (single and target.is_file()):
            return target
        try:
            if single:
                listing = {"": int(fs.info(root)["size"])}
            else:
                found = fs.find(root, detail=True)
                sizes = {key[len(root) :].lstrip("/"): int(info["size"]) for key, info in found.items()}
                listing = {path: sizes[path] for path in choose_files(list(sizes)) if path}
        except FileNotFoundError as exc:
            raise ExecutionError(f"model {url} was not found; check source.identifier") from exc
        except Exception as exc:  # botocore's credential and endpoint errors share no base class
            raise ExecutionError(
                f"model {url} could not be listed ({type(exc).__name__}: {exc}); give the worker credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or a role) and, for an S3-compatible store, "
                'MLOC_MODEL_SOURCE_OPTIONS={"endpoint_url": "..."}'
            ) from exc
        if not listing:
            raise ExecutionError(f"model {url} holds no files; point source.identifier at a .gguf or a model folder")
        partial = entry.path / ".model.partial"
        dests = {path: (target if single else partial / safe_relative(path, url)) for path in listing}
        total = sum(listing.values())
        present = sum(min(part_bytes(dests[path]), size) for path, size in listing.items())
        room = make_room(entry, total - present, max_bytes=options.max_bytes, min_free_bytes=options.min_free_bytes,
                         source=url)  # fmt: skip
        progress = Progress(name or url, total, present, hook=on_progress, check_cancelled=check_cancelled)
        report_room(room, progress)
        for path, size in listing.items():
            dest = dests[path]
            if not (dest.is_file() and dest.stat().st_size == size):
                fs_download(fs, f"{root}/{path}" if path else root, dest, size=size, progress=progress)
        if not single:
            (partial / COMPLETE).write_text(f"{url}\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        entry.mark("url", url)
        progress.finished()
    return target
