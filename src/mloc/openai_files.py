"""Files uploaded through the OpenAI Files API (POST /v1/files): the bytes under the orchestrator's
RESULTS_DIR, their metadata in Redis.

Layout::

    RESULTS_DIR/files/<file_id>              the upload, as sent (owner-only)
    RESULTS_DIR/files/<file_id>.rows.jsonl   its batch lines as MLOC dataset rows, written at batch create

Both are written under a temporary name and renamed, so no reader sees half a file. A task reads its
rows file as ``inference.input.path``; :mod:`mloc.modelroots` lets a user's task name it only when the
file is that user's, by the owner stored here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis

from mloc import keys

FILES_DIR = "files"
ROWS_SUFFIX = ".rows.jsonl"
FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
# Upload names are metadata only (never a path); longer ones are cut.
MAX_FILENAME = 255


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's metadata."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's FileObject."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def upload_id(name: str) -> str | None:
    """The id of the upload a file name in the files folder is, or is made from (its rows file)."""
    file_id = name.removesuffix(ROWS_SUFFIX)
    return file_id if FILE_ID.match(file_id) else None


async def file_owner(redis: aioredis.Redis, file_id: str) -> str | None:
    owner = await redis.hget(keys.openai_file(file_id), "owner")
    return owner.decode() if isinstance(owner, bytes) else owner


class FileStore:
    """Uploads under ``results_dir/files``, with their metadata in Redis."""

    def __init__(self, redis: aioredis.Redis, results_dir: Path) -> None:
        self.redis = redis
        self.folder = Path(os.path.abspath(results_dir.expanduser())) / FILES_DIR

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    def rows_path(self, file_id: str) -> Path:
        return self.folder / (file_id + ROWS_SUFFIX)

    def temporary(self) -> tuple[IO[bytes], Path]:
        """A new owner-only file in the files folder, to be renamed once whole."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=".partial-")
        return os.fdopen(fd, "wb"), Path(name)

    def _write(self, source: IO[bytes], target: Path) -> int:
        handle, partial = self.temporary()
        try:
            with handle:
                shutil.copyfileobj(source, handle, 1 << 20)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    async def save(self, source: IO[bytes], *, filename: str, purpose: str, owner: str) -> StoredFile:
        """Store an upload (read from ``source`` in a thread) and its metadata; the answer is its record."""
        file_id = "file-" + uuid.uuid4().hex
        target = self.path(file_id)
        size = await asyncio.to_thread(self._write, source, target)
        stored = StoredFile(file_id, size, int(time.time()), filename[:MAX_FILENAME], purpose, owner)
        try:
            await self.redis.hset(keys.openai_file(file_id), mapping=_fields(stored))
        except BaseException:
            # Without its metadata nobody can name the file: it would only take room.
            with contextlib.suppress(OSError):
                target.unlink()
            raise
        return stored

    async def get(self, file_id: str) -> StoredFile | None:
        if not FILE_ID.match(file_id):
            return None
        fields = await self.redis.hgetall(keys.openai_file(file_id))
        if not fields:
            return None
        h = {_text(k): _text(v) for k, v in fields.items()}
        return StoredFile(h["id"], int(h["bytes"]), int(h["created_at"]), h["filename"], h["purpose"], h["owner"])


def _fields(stored: StoredFile) -> dict[str, str]:
    return {
        "id": stored.id,
        "bytes": str(stored.bytes),
        "created_at": str(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "owner": stored.owner,
    }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
