"""Moving a model's bytes onto this host: resumable HTTP and fsspec transfers, and their progress.

A model can be tens of gigabytes, so a transfer never starts over for nothing. Each file is written to
``<name>.part`` beside its destination and renamed into place once complete; a dropped connection or a
killed worker leaves the ``.part`` file, and the next attempt asks only for the rest (an HTTP Range
request, or a seek on an fsspec file). Progress is reported in bytes with an estimate of the time left.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError

if TYPE_CHECKING:
    import httpx

# on_progress(done_bytes, total_bytes, message): RunContext.progress fits it as it is.
ProgressHook = Callable[[int, int | None, str], object]
# Raises to stop a transfer between chunks (RunContext.check_cancelled fits it).
CancelCheck = Callable[[], None]

CHUNK = 1 << 20
# Attempts per file within one call; each resumes where the last stopped.
ATTEMPTS = 4
RETRY_PAUSE_SEC = 1.0
REPORT_EVERY_SEC = 0.5
PART = ".part"
VALIDATOR = ".part.json"


def format_bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


class Progress:
    """Bytes done of a known total for one model, reported to a hook a few times a second.

    The estimate of time left uses only the bytes moved since this transfer began, so a resumed
    download does not look faster than it is."""

    def __init__(
        self,
        what: str,
        total: int,
        done: int = 0,
        *,
        hook: ProgressHook | None = None,
        check_cancelled: CancelCheck | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.done = done
        self.hook = hook
        self.check_cancelled = check_cancelled
        self._started = time.monotonic()
        self._start_done = done
        self._last = 0.0

    def message(self) -> str:
        if not self.total:  # the server did not say how big the file is
            return f"downloading {self.what}: {format_bytes(self.done)} so far"
        text = f"downloading {self.what}: {format_bytes(self.done)} of {format_bytes(self.total)}"
        moved, elapsed = self.done - self._start_done, time.monotonic() - self._started
        if moved > 0 and elapsed > 1 and self.total > self.done:
            text += f", about {format_duration((self.total - self.done) * elapsed / moved)} left"
        return text

    def advance(self, count: int) -> None:
        self.done += count
        if self.check_cancelled is not None:
            self.check_cancelled()
        now = time.monotonic()
        if self.hook is not None and now - self._last >= REPORT_EVERY_SEC:
            self._last = now
            self.hook(self.done, self.total, self.message())

    def rewind(self, count: int) -> None:
        """Take back bytes a transfer has to fetch again (the server sent the whole file, not the rest)."""
        self.done = max(0, self.done - count)

    def finished(self) -> None:
        if self.hook is not None:
            took = format_duration(time.monotonic() - self._started)
            size = self.total or self.done
            self.hook(size, size, f"downloaded {self.what} ({format_bytes(size)}) in {took}")


def part_bytes(dest: Path) -> int:
    """Bytes of ``dest`` already on disk: all of it when complete, else its ``.part`` file."""
    if dest.is_file():
        return dest.stat().st_size
    part = dest.with_name(dest.name + PART)
    return part.stat().st_size if part.is_file() else 0


def _finish(part: Path, dest: Path, expected: int | None, source: str) -> None:
    size = part.stat().st_size
    if expected is not None and size != expected:
        part.unlink(missing_ok=True)
        raise ExecutionError(
            f"download of {source} ended at {size} bytes but {expected} were announced; the partial file "
            "was removed, so the next try starts afresh"
        )
    part.with_name(dest.name + VALIDATOR).unlink(missing_ok=True)
    os.replace(part, dest)


def _validator(response: httpx.Response) -> str | None:
    """What If-Range may send to make sure the rest comes from the same file: a strong ETag, else the
    Last-Modified date (a weak ETag is not allowed there)."""
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("last-modified")


def http_download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    progress: Progress,
    headers: dict[str, str] | None = None,
    expected_size: int | None = None,
    immutable: bool = False,
) -> None:
    """Download ``url`` to ``dest``, resuming a ``.part`` file left by an earlier attempt.

    ``immutable`` says the URL always names the same bytes (a hub file at a commit): the rest is asked
    for without If-Range. Otherwise the part is resumed only if the server still has the same file."""
    import httpx

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART)
    validator_file = dest.with_name(dest.name + VALIDATOR)
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.is_file() else 0
        if expected_size is not None and have == expected_size:
            break
        wanted = dict(headers or {})
        saved = None if immutable else _read_validator(validator_file)
        # Without a validator nothing proves the part is of the file the server has now: ask for all.
        if have and (immutable or saved):
            wanted["Range"] = f"bytes={have}-"
            if saved:
                wanted["If-Range"] = saved
        try:
            with client.stream("GET", url, headers=wanted) as response:
                if response.status_code == 416 and have:
                    # Asked past the end: the part is the whole file (its size was not announced).
                    break
                if response.status_code >= 400:
                    raise ExecutionError(f"download of {_shown(url)} failed: HTTP {response.status_code}")
                if response.status_code == 206 and _range_start(response) != have:
                    # Not the rest that was asked for; start this file again on the next attempt.
                    part.unlink(missing_ok=True)
                    progress.rewind(have)
                    raise _Restart(f"server answered a range request for byte {have} with another range")
                resumed = response.status_code == 206
                if not resumed:
                    progress.rewind(have)
                    have = 0
                    validator = _validator(response)
                    if validator and not immutable:
                        validator_file.write_text(json.dumps({"validator": validator}), encoding="utf-8")
                with part.open("ab" if resumed else "wb") as handle:
                    for chunk in response.iter_bytes():  # as it arrives: a cut loses nothing held back
                        handle.write(chunk)
                        progress.advance(len(chunk))
            break
        except (httpx.TransportError, httpx.DecodingError, _Restart) as exc:
            if attempt == ATTEMPTS - 1:
                raise ExecutionError(
                    f"download of {_shown(url)} failed {ATTEMPTS} times, last with {type(exc).__name__}: {exc}; "
                    "the part downloaded so far is kept and the next try resumes it"
                ) from exc
            time.sleep(RETRY_PAUSE_SEC * (attempt + 1))
    _finish(part, dest, expected_size, _shown(url))


def fs_download(fs: Any, path: str, dest: Path, *, size: int, progress: Progress) -> None:
    """Copy one file of an fsspec file system (S3) to ``dest``, resuming a ``.part`` file.

    Object stores keep an object's bytes until it is overwritten; a part longer than the object means
    it was, and the copy starts over."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART)
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.is_file() else 0
        if have > size:
            progress.rewind(have)
            part.unlink()
            have = 0
        if have == size:
            break
        try:
            with fs.open(path, "rb", block_size=8 * CHUNK) as source, part.open("ab") as handle:
                source.seek(have)
                while chunk := source.read(CHUNK):
                    handle.write(chunk)
                    progress.advance(len(chunk))
            break
        except OSError as exc:
            if attempt == ATTEMPTS - 1:
                raise ExecutionError(
                    f"copy of {path} failed {ATTEMPTS} times, last with {type(exc).__name__}: {exc}; "
                    "the part copied so far is kept and the next try resumes it"
                ) from exc
            time.sleep(RETRY_PAUSE_SEC * (attempt + 1))
    _finish(part, dest, size, path)


class _Restart(Exception):
    """A transfer attempt that must start its file again."""


def _read_validator(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("validator")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _range_start(response: httpx.Response) -> int | None:
    # "bytes 100-199/200"
    value = response.headers.get("content-range", "")
    try:
        return int(value.split(" ", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _shown(url: str) -> str:
    """A URL fit for messages: no query string (signed URLs carry credentials there)."""
    return url.split("?", 1)[0]
