"""`mloc backup` and `mloc restore` as an operator runs them: separate processes, a real `mloc up` with its
embedded Redis in a home of its own, real redis-servers, and real files (a full or read-only disk is a tiny
tmpfs, a Redis whose files are on another host is one whose data folder is a mount only it sees)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from mloc import embedded
from mloc.client import ApiError, Client
from mloc.homelock import HomeLock
from tests.conftest import RedisServer, free_port, real_clock_env
from tests.reliability.conftest import tmpfs
from tests.support.api import wait_until
from tests.support.cli import mloc
from tests.test_cli_up import READY, Up, up_env


def run_mloc(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return mloc(*args, env=env, timeout=timeout, inherit=False)


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time, to tell that nothing changed."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def start_up() -> Iterator[Callable[[dict[str, str]], Up]]:
    started: list[Up] = []

    def start(env: dict[str, str]) -> Up:
        up = Up(env)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    """An RDB a real server wrote, holding one key."""
    server = RedisServer(tmp_path / "source").start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("mloc:restored", "yes")
        client.save()
    finally:
        server.stop()
    return Path(shutil.copy(tmp_path / "source" / "dump.rdb", tmp_path / "snapshot.rdb"))


@pytest.fixture
def stopped_home(tmp_path: Path) -> Path:
    """An MLOC home whose embedded Redis has data (its appendonlydir) and is stopped."""
    home = tmp_path / "home"
    server = embedded.start(home)
    try:
        redis.Redis.from_url(server.url).set("mloc:before", "kept")  # written out when it stops
    finally:
        server.stop()
    assert (home / "redis" / "appendonlydir").is_dir()
    return home


def test_a_backup_restored_into_the_stopped_home_brings_its_tasks_back_and_keeps_the_data_it_replaced(
    tmp_path: Path, start_up: Callable[[dict[str, str]], Up]
) -> None:
    home, port = tmp_path / "home", free_port()
    env = up_env(home, port)
    first = start_up(env)
    first.output.wait_for(READY)
    client = Client(f"http://127.0.0.1:{port}")
    backed_up = [client.submit({"taskType": "echo", "payload": {"n": n}})["task_id"] for n in range(3)]
    for task_id in backed_up:
        wait_until(client, task_id, lambda record: record["state"] == "succeeded")

    file = tmp_path / "backups" / "mloc.rdb"
    file.parent.mkdir()
    made = run_mloc("backup", str(file), env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"wrote {file}: "), made.stdout
    assert "3 tasks (3 succeeded) in " in made.stdout and f"a snapshot of the embedded Redis of {home}" in made.stdout
    assert f"({file.stat().st_size} bytes)" in made.stdout
    assert [path.name for path in file.parent.iterdir()] == ["mloc.rdb"]  # no temporary file left beside it
    assert file.read_bytes()[:5] in (b"REDIS", b"VALKE")

    later = client.submit({"taskType": "echo", "payload": "after the backup"})["task_id"]
    wait_until(client, later, lambda record: record["state"] == "succeeded")
    stopped = run_mloc("down", env=env)
    assert stopped.returncode == 0, stopped.stderr
    first.proc.wait(10)

    restored = run_mloc("restore", str(file), env=env)
    assert restored.returncode == 0, restored.stderr
    said = restored.stdout.splitlines()
    assert said[0].startswith(f"restored {file} into {home / 'redis'}: 3 tasks (3 succeeded) in "), said
    kept = [path for path in (home / "redis").iterdir() if path.name.startswith("appendonlydir.before-restore-")]
    assert len(kept) == 1 and (kept[0] / "appendonly.aof.manifest").is_file(), kept
    assert said[1].startswith(f"the data it replaced is kept in {kept[0]}: "), said
    assert said[-1] == "start MLOC with `mloc up`: it serves the restored tasks"
    assert not [path for path in (home / "redis").iterdir() if path.name.startswith(".restore-")]

    second = start_up(env)
    second.output.wait_for(READY)
    assert f"restored from {home}: 3 tasks (3 succeeded)" in second.output.lines, second.output.text
    for n, task_id in enumerate(backed_up):
        assert client.task(task_id)["state"] == "succeeded"
        assert client.result(task_id)["payload"] == {"n": n}
    with pytest.raises(ApiError) as gone:
        client.task(later)
    assert gone.value.status_code == 404
    client.close()


def test_restore_is_refused_while_mloc_runs_on_the_home_and_changes_nothing(stopped_home: Path, snapshot: Path) -> None:
    env = up_env(stopped_home, free_port())
    before = tree(stopped_home / "redis")
    # What a running `mloc up` holds for its whole life.
    lock = HomeLock(stopped_home).acquire("http://127.0.0.1:8000")
    try:
        refused = run_mloc("restore", str(snapshot), env=env)
    finally:
        lock.release()
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        f"error: MLOC runs on MLOC_HOME {stopped_home} (pid {os.getpid()}): stop it first with `mloc down` (same "
        "MLOC_HOME), then restore; a restore replaces the data its Redis serves, so it runs only while MLOC is stopped"
    ]
    assert tree(stopped_home / "redis") == before

    # An embedded Redis that an MLOC process started without `mloc up` (`mloc start`) serves the data too.
    server = embedded.start(stopped_home)
    try:
        refused = run_mloc("restore", str(snapshot), env=env)
    finally:
        server.stop()
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: the embedded Redis of MLOC_HOME {stopped_home} runs ({server.url})")
    assert "`mloc down`" in refused.stderr
    assert redis_value(stopped_home, "mloc:before") == "kept"


def redis_value(home: Path, key: str) -> str | None:
    """``key`` as the home's embedded Redis serves it at its next start."""
    server = embedded.start(home)
    try:
        value = redis.Redis.from_url(server.url, decode_responses=True).get(key)
        return str(value) if value is not None else None
    finally:
        server.stop()


def _missing(tmp_path: Path, snapshot: Path) -> tuple[Path, str]:
    return tmp_path / "no-such.rdb", "does not exist; name a backup file that `mloc backup` wrote"


def _not_an_rdb(tmp_path: Path, snapshot: Path) -> tuple[Path, str]:
    path = tmp_path / "notes.txt"
    path.write_text("my tasks\n")
    return path, "is not a Redis snapshot: an RDB file starts with REDIS or VALKEY"


def _cut_short(tmp_path: Path, snapshot: Path) -> tuple[Path, str]:
    path = tmp_path / "cut.rdb"
    path.write_bytes(snapshot.read_bytes()[:40])  # the header, then nothing: a copy that stopped early
    return path, "does not load in "


def _a_folder(tmp_path: Path, snapshot: Path) -> tuple[Path, str]:
    path = tmp_path / "appendonlydir"
    path.mkdir()
    return path, "is a folder; name the backup file that `mloc backup` wrote (an appendonlydir is a stopped server's"


@pytest.mark.parametrize("bad", [_missing, _not_an_rdb, _cut_short, _a_folder], ids=lambda f: f.__name__[1:])
def test_restore_of_a_file_that_is_not_a_whole_backup_says_so_and_leaves_the_home_untouched(
    bad: Callable[[Path, Path], tuple[Path, str]], tmp_path: Path, stopped_home: Path, snapshot: Path
) -> None:
    path, message = bad(tmp_path, snapshot)
    before = tree(stopped_home / "redis")
    refused = run_mloc("restore", str(path), env=up_env(stopped_home, free_port()))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.startswith(f"error: {path} {message}"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and refused.stdout == ""
    assert tree(stopped_home / "redis") == before
    assert redis_value(stopped_home, "mloc:before") == "kept"


@pytest.fixture
def server_with_data(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis on this machine with a few hundred KiB in it (more than a tiny disk holds)."""
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    for n in range(20):
        client.set(f"mloc:blob:{n}", os.urandom(16 * 1024))
    yield server
    server.stop()


def _backup_env(tmp_path: Path, url: str) -> dict[str, str]:
    return up_env(tmp_path / "home", free_port(), REDIS_URL=url)


def test_backup_to_a_path_it_cannot_write_fails_saying_so_and_leaves_no_file(
    tmp_path: Path, server_with_data: RedisServer
) -> None:
    env = _backup_env(tmp_path, server_with_data.url)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    through_a_file = run_mloc("backup", str(blocker / "mloc.rdb"), env=env)
    assert through_a_file.returncode == 2
    assert through_a_file.stderr == (
        f"error: cannot write {blocker / 'mloc.rdb'}: {blocker}: Not a directory; name a file in a folder you may "
        "write to\n"
    )

    with tmpfs(tmp_path / "full", "64k") as full:
        # The temporary file is made, then the disk fills while the snapshot is copied into it.
        filled = run_mloc("backup", str(full / "mloc.rdb"), env=env)
        assert filled.returncode == 2, filled.stdout + filled.stderr
        assert filled.stderr.startswith(f"error: cannot write {full / 'mloc.rdb'}: No space left on device; nothing")
        assert list(full.iterdir()) == []

        subprocess.run(["mount", "-o", "remount,ro", str(full)], check=True)
        read_only = run_mloc("backup", str(full / "mloc.rdb"), env=env)
        assert read_only.returncode == 2
        assert read_only.stderr.startswith(f"error: cannot write {full / 'mloc.rdb'}: {full}: Read-only file system")
        assert list(full.iterdir()) == []

    existing = tmp_path / "earlier.rdb"
    existing.write_text("an earlier backup")
    kept = run_mloc("backup", str(existing), env=env)
    assert kept.returncode == 2
    assert kept.stderr == f"error: {existing} exists; pass --force to replace it, or name another file\n"
    assert existing.read_text() == "an earlier backup"
    replaced = run_mloc("backup", "--force", str(existing), env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert "20 keys" in replaced.stdout and existing.read_bytes()[:5] == b"REDIS"


def test_backup_of_a_redis_that_is_gone_fails_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    gone = run_mloc("backup", str(target / "mloc.rdb"), env=_backup_env(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))
    assert gone.returncode == 2
    assert gone.stderr.startswith("error: cannot reach the Redis at redis://127.0.0.1:")
    assert "is MLOC running? (`mloc up`)" in gone.stderr
    assert list(target.iterdir()) == []


def test_backup_of_a_redis_whose_files_this_machine_cannot_read_says_what_to_use_instead(tmp_path: Path) -> None:
    """As for a Redis on another host: its data folder here is a mount only the server sees."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give a redis-server a mount of its own")
    folder, port = tmp_path / "elsewhere", free_port()
    folder.mkdir()
    stale = folder / "dump.rdb"
    stale.write_bytes(b"REDIS0011 an old snapshot of another server")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    binary = shutil.which("redis-server")
    assert binary is not None
    script = (
        f"mount -t tmpfs tmpfs {folder} && mkdir {folder}/inside && exec {binary} --port {port} --bind 127.0.0.1 "
        f"--dir {folder} --save '' --appendonly no --enable-protected-configs yes"
    )
    server = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=real_clock_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("mloc:k", "v")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        env = _backup_env(tmp_path, url)
        out = tmp_path / "out"
        out.mkdir()

        # The server writes its snapshot there; this machine finds only the old file of that name.
        stale_copy = run_mloc("backup", str(out / "mloc.rdb"), env=env)
        assert stale_copy.returncode == 2, stale_copy.stdout + stale_copy.stderr
        assert stale_copy.stderr.startswith(
            f"error: the Redis at {url} keeps its snapshot where this machine cannot read it ({stale} here is older "
            "than the snapshot it just wrote): `mloc backup` copies the snapshot file"
        ), stale_copy.stderr
        assert (
            "`redis-cli -u REDIS_URL --rdb FILE`" in stale_copy.stderr and "provider's snapshots" in stale_copy.stderr
        )

        # A folder this machine does not have at all: said before the server is asked for a snapshot.
        client.config_set("dir", str(folder / "inside"))
        saves = int(client.info("persistence")["rdb_saves"])
        no_folder = run_mloc("backup", str(out / "mloc.rdb"), env=env)
        assert no_folder.returncode == 2
        assert f"(its folder {folder / 'inside'} is not a folder this machine can read)" in no_folder.stderr, (
            no_folder.stderr
        )
        assert int(client.info("persistence")["rdb_saves"]) == saves
        assert list(out.iterdir()) == []
    finally:
        server.terminate()
        server.wait(10)
