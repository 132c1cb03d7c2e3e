"""Files uploaded through the OpenAI Files API (POST /v1/files): the bytes under the orchestrator's
RESULTS_DIR, their metadata in Redis.

Layout::

    RESULTS_DIR/files/<file_id>              the upload, as sent (owner-only)
    RESULTS_DIR/files/<file_id>.rows.jsonl   its batch lines as MLOC dataset rows, written at batch create

Both are written under a temporary name and renamed, so no reader sees half a file. A task reads its
rows file as ``inference.input.path``; :mod:`mloc.modelroots` lets a user's task name it only when the
file is that user's, by the owner stored here.

Each owner's uploads are also in a sorted set (:func:`mloc.keys.openai_files_of`, scored by upload time in
milliseconds) for GET /v1/files; an id there whose metadata is gone is dropped when a listing meets it.

A batch's output and error files are listed there too once the batch has ended, scored by its end: their
metadata (``task``, and ``ended``, the end it was taken at) is in the same hash, their bytes are the
batch task's result lines, never copied here. A deleted one keeps its hash, marked ``deleted``, until its
batch ends again (a resumed batch's file holds new lines) or its task is forgotten.

The metadata hash also names the batches made from the file (``used_by:<task id>``), and holds a claim
(``claim:<nonce>``, its time) while one is being made, so a delete can refuse while a batch still reads
the rows, and a batch cannot be made from a file a delete has just removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.errors import Conflict, Unavailable

log = logging.getLogger(__name__)

FILES_DIR = "files"
ROWS_SUFFIX = ".rows.jsonl"
# The label that names, on a batch's task, the uploaded file it reads.
INPUT_FILE_LABEL = "openai.input_file_id"
FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
# The purpose of a batch's output and error files, as OpenAI names it.
OUTPUT_PURPOSE = "batch_output"
# Upload names are metadata only (never a path); longer ones are cut.
MAX_FILENAME = 255
USED_BY = "used_by:"
CLAIM = "claim:"
# A claim older than this is from a batch create that died half-way: it no longer holds a delete back.
CLAIM_SEC = 600
# How often a write to a file's metadata looks again when the metadata changed while it looked.
WATCH_TRIES = 5


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's metadata, or a batch's output or error file's (``task``: the batch's task id,
    ``ended``: the task's end its size was taken at)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str
    task: str | None = None
    ended: str | None = None
    deleted: bool = False

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
        """A new owner-only file in the files folder, to be renamed once whole; Unavailable, naming
        RESULTS_DIR, when the folder cannot take it."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=".partial-")
        except OSError as exc:
            raise self.unwritable(exc) from exc
        return os.fdopen(fd, "wb"), Path(name)

    def unwritable(self, exc: OSError) -> Unavailable:
        """The answer to a write the files folder refused (a read-only or full disk, a folder of another
        user): a fault of the deployment, which the message tells the operator how to fix."""
        reason = exc.strerror or type(exc).__name__
        log.error("uploads cannot be written to %s: %s", self.folder, exc)
        return Unavailable(
            f"the orchestrator cannot store uploads: its RESULTS_DIR ({self.folder.parent}) cannot be written "
            f"({reason}); set RESULTS_DIR to a writable folder with free space, shared with the workers (the "
            "volume they keep their results on), and try again"
        )

    def _write(self, source: IO[bytes], target: Path) -> int:
        handle, partial = self.temporary()
        try:
            with handle:
                shutil.copyfileobj(source, handle, 1 << 20)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise self.unwritable(exc) from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    async def save(self, source: IO[bytes], *, filename: str, purpose: str, owner: str) -> StoredFile:
        """Store an upload (read from ``source`` in a thread) and its metadata; the answer is its record."""
        file_id = "file-" + uuid.uuid4().hex
        target = self.path(file_id)
        size = await asyncio.to_thread(self._write, source, target)
        now = time.time()
        stored = StoredFile(file_id, size, int(now), filename[:MAX_FILENAME], purpose, owner)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.openai_file(file_id), mapping=_fields(stored))
                pipe.zadd(keys.openai_files_of(owner), {file_id: int(now * 1000)})
                await pipe.execute()
        except BaseException:
            # Without its metadata nobody can name the file: it would only take room.
            with contextlib.suppress(OSError):
                target.unlink()
            raise
        return stored

    async def claim(self, file_id: str) -> str | None:
        """Mark the file as the input of a batch being made; the claim's name, or None when the file is gone.

        :meth:`used_by` turns the claim into the batch's mark once its task exists, :meth:`release` drops
        it when none was made."""
        field = CLAIM + uuid.uuid4().hex
        now = str(time.time())
        present = await self._while_present(file_id, lambda key, pipe: pipe.hset(key, field, now))
        return field if present else None

    async def used_by(self, file_id: str, claim: str, task_id: str) -> None:
        """Record the task a claim became: the file is now that batch's input."""

        def mark(key: str, pipe: Any) -> None:
            pipe.hdel(key, claim)
            pipe.hset(key, USED_BY + task_id, "1")

        await self._while_present(file_id, mark)

    async def release(self, file_id: str, claim: str) -> None:
        await self.redis.hdel(keys.openai_file(file_id), claim)

    async def _while_present(self, file_id: str, write: Callable[[str, Any], object]) -> bool:
        """Make ``write``'s changes to the file's metadata if it still exists (a write to a deleted file's
        hash would bring back a record without a file); whether it did."""
        key = keys.openai_file(file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_TRIES):
                try:
                    await pipe.watch(key)
                    if not await pipe.exists(key):
                        return False
                    pipe.multi()
                    write(key, pipe)
                    await pipe.execute()
                    return True
                except aioredis.WatchError:
                    continue  # another batch create or a delete came first: look again
        raise Conflict(f"file {file_id} kept changing while MLOC recorded a batch made from it; try again")

    async def delete(self, file_id: str, running: Callable[[list[str]], Awaitable[list[str]]]) -> Deleted:
        """Remove the file, its rows and its metadata, unless a batch made from it has not ended.

        ``running`` gets the task ids of the file's batches and answers those that have not ended."""
        key = keys.openai_file(file_id)
        if not FILE_ID.match(file_id):
            return Deleted(None)
        for _ in range(WATCH_TRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    fields = {_text(k): _text(v) for k, v in (await pipe.hgetall(key)).items()}
                    if not fields:
                        return Deleted(None)
                    stored = _stored(fields)
                    users = [name.removeprefix(USED_BY) for name in fields if name.startswith(USED_BY)]
                    blocking = await running(users) if users else []
                    recent = time.time() - CLAIM_SEC
                    making = any(name.startswith(CLAIM) and float(value) > recent for name, value in fields.items())
                    if blocking or making:
                        return Deleted(stored, in_use=blocking)
                    pipe.multi()
                    pipe.delete(key)
                    pipe.zrem(keys.openai_files_of(stored.owner), file_id)
                    await pipe.execute()
                except aioredis.WatchError:
                    continue  # a batch was made from it while we looked: look again
            # Without its metadata nobody can name the file any more: its bytes go now.
            await asyncio.to_thread(self._remove, file_id)
            return Deleted(stored, deleted=True)
        # Batches keep being made from it: as good as one being made now.
        return Deleted(stored, in_use=[])

    def _remove(self, file_id: str) -> None:
        for path in (self.path(file_id), self.rows_path(file_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def output(self, file_id: str) -> StoredFile | None:
        """A batch's output or error file's metadata, as filed (deleted ones too), or None."""
        fields = await self.redis.hgetall(keys.openai_file(file_id))
        if not fields:
            return None
        stored = _stored({_text(k): _text(v) for k, v in fields.items()})
        return stored if stored.task is not None else None

    async def file_output(self, stored: StoredFile, *, ended_at: float, ttl: int | None) -> None:
        """List a batch's output or error file, taken at its batch's end ``stored.ended`` (``ended_at``, its
        time, orders it), unless it is already filed, or deleted, for that end."""

        def write(pipe: Any, current: StoredFile | None) -> bool:
            if current is not None and current.ended == stored.ended:
                return False
            key = keys.openai_file(stored.id)
            pipe.delete(key)
            pipe.hset(key, mapping=_fields(stored))
            pipe.zadd(keys.openai_files_of(stored.owner), {stored.id: int(ended_at * 1000)})
            if ttl:
                pipe.expire(key, ttl)
            return True

        await self._change_output(stored.id, write)

    async def delete_output(self, stored: StoredFile, *, ttl: int | None) -> None:
        """Delete a batch's output or error file: no longer listed or read, until its batch ends again."""

        def write(pipe: Any, current: StoredFile | None) -> bool:
            if current is not None and current.ended != stored.ended:
                return False  # filed anew meanwhile (its batch ended again): a file the caller has not seen
            key = keys.openai_file(stored.id)
            pipe.delete(key)
            pipe.hset(key, mapping=_fields(dataclasses.replace(stored, deleted=True)))
            pipe.zrem(keys.openai_files_of(stored.owner), stored.id)
            if ttl:
                pipe.expire(key, ttl)
            return True

        await self._change_output(stored.id, write)

    async def drop_output(self, file_id: str, owner: str) -> None:
        """Forget a batch's output or error file: its task is gone, or runs again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.openai_file(file_id))
            pipe.zrem(keys.openai_files_of(owner), file_id)
            await pipe.execute()

    async def _change_output(self, file_id: str, write: Callable[[Any, StoredFile | None], bool]) -> None:
        """Make ``write``'s changes to an output file's metadata as one, against what it is now: a delete
        and the filing of the same file must not cross (a deleted file would come back)."""
        key = keys.openai_file(file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_TRIES):
                try:
                    await pipe.watch(key)
                    fields = {_text(k): _text(v) for k, v in (await pipe.hgetall(key)).items()}
                    current = _stored(fields) if fields else None
                    pipe.multi()
                    if not write(pipe, current):
                        await pipe.reset()
                        return
                    await pipe.execute()
                    return
                except aioredis.WatchError:
                    continue  # filed or deleted meanwhile: look again
        raise Conflict(f"file {file_id} kept changing while MLOC recorded it; try again")

    async def get(self, file_id: str) -> StoredFile | None:
        if not FILE_ID.match(file_id):
            return None
        fields = await self.redis.hgetall(keys.openai_file(file_id))
        if not fields:
            return None
        return _stored({_text(k): _text(v) for k, v in fields.items()})

    async def listed(
        self,
        owner: str,
        *,
        purpose: str | None,
        after: str | None,
        limit: int,
        newest_first: bool,
        stale: Callable[[list[StoredFile]], Awaitable[set[str]]] | None = None,
    ) -> tuple[list[StoredFile], bool] | None:
        """A page of the owner's files in the order they came (``newest_first`` or oldest first), those of
        ``purpose`` only when it is given, starting past the file ``after``; with whether more follow.
        None when ``after`` is not one of the owner's files. ``stale`` answers which of the batch output
        files met no longer hold (their task is gone, or runs again): those are dropped from the list."""
        await self._index_older_uploads()
        index = keys.openai_files_of(owner)
        start = 0
        if after is not None:
            rank = await (self.redis.zrevrank if newest_first else self.redis.zrank)(index, after)
            if rank is None:
                return None
            start = rank + 1
        page = self.redis.zrevrange if newest_first else self.redis.zrange
        found: list[StoredFile] = []
        # One more than asked for tells whether more follow; a purpose filter may skip any number of them.
        step = max(limit + 1, 100)
        while len(found) <= limit:
            ids = [_text(i) for i in await page(index, start, start + step - 1)]
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(keys.openai_file(file_id))
                hashes = await pipe.execute()
            gone = [file_id for file_id, fields in zip(ids, hashes, strict=True) if not fields]
            if gone:
                # Deleted while the listing looked, or indexed by a backfill that raced the delete.
                await self.redis.zrem(index, *gone)
            met = [_stored({_text(k): _text(v) for k, v in fields.items()}) for fields in hashes if fields]
            outputs = [stored for stored in met if stored.task is not None]
            dropped = await stale(outputs) if stale is not None and outputs else set()
            for file_id in dropped:
                await self.drop_output(file_id, owner)
            for stored in met:
                if stored.id not in dropped and not stored.deleted and (purpose is None or stored.purpose == purpose):
                    found.append(stored)
            start += len(ids) - len(gone) - len(dropped)
        return found[:limit], len(found) > limit

    async def _index_older_uploads(self) -> None:
        """Put the uploads stored before the owner indexes existed in them, once per Redis: they are
        listed as any other. Adding an id twice changes nothing, so two orchestrators may both do it."""
        if await self.redis.exists(keys.OPENAI_FILES_INDEXED):
            return
        async for key in self.redis.scan_iter(match=keys.openai_file("file-*"), count=1000):
            fields = await self.redis.hmget(key, ["id", "owner", "created_at"])
            file_id, owner, created = (_text(v) if v is not None else None for v in fields)
            if file_id and owner and created and FILE_ID.match(file_id):
                # NX: an upload that indexed itself keeps its own, finer time.
                await self.redis.zadd(keys.openai_files_of(owner), {file_id: int(created) * 1000}, nx=True)
        await self.redis.set(keys.OPENAI_FILES_INDEXED, "1")


@dataclass(frozen=True)
class Deleted:
    """What a delete found: no file (``file`` None), the file removed, or the file kept because batches
    made from it have not ended (``in_use``, their task ids; empty while one is being made)."""

    file: StoredFile | None
    deleted: bool = False
    in_use: list[str] | None = None


def _stored(h: dict[str, str]) -> StoredFile:
    return StoredFile(
        h["id"],
        int(h["bytes"]),
        int(h["created_at"]),
        h["filename"],
        h["purpose"],
        h["owner"],
        task=h.get("task"),
        ended=h.get("ended"),
        deleted=h.get("deleted") == "1",
    )


def _fields(stored: StoredFile) -> dict[str, str]:
    fields = {
        "id": stored.id,
        "bytes": str(stored.bytes),
        "created_at": str(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "owner": stored.owner,
    }
    if stored.task is not None:
        fields["task"] = stored.task
    if stored.ended is not None:
        fields["ended"] = stored.ended
    if stored.deleted:
        fields["deleted"] = "1"
    return fields


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
