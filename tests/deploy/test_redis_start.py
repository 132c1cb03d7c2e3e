"""How the Redis containers start (docker-compose.yml and every Kubernetes overlay), run with the local
redis-server the way the container runs it: behind the image's entrypoint, with the container's
environment. The password is required, no process shows it in its arguments at any moment (every user of
the host reads those: ps, /proc/<pid>/cmdline), the health checks pass through REDISCLI_AUTH, and SIGTERM
reaches redis-server itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .conftest import (
    TEST_PASSWORD,
    TEST_TOKEN,
    compose_config,
    container_argv,
    overlays,
    rendered,
)

START_TIMEOUT_SEC = 15.0
# Values of the Secrets scripts/deploy_k8s.sh creates, for the test.
K8S_SECRETS = {
    ("mloc-redis", "password"): TEST_PASSWORD,
    ("mloc-redis", "url"): f"redis://:{TEST_PASSWORD}@redis:6379/0",
    ("mloc-auth", "orchestrator-token"): TEST_TOKEN,
}
# Stands in for the redis image's docker-entrypoint.sh: where that one puts `--protected-mode no` after
# `redis-server`, this one puts the test's port, address and data folder (for the image's /data), and
# keeps redis-server's arguments as they were given (set-proc-title no), so that one holding the
# password stays in sight instead of being overwritten a few milliseconds after the start.
ENTRYPOINT = """#!/bin/sh
[ "$1" = redis-server ] || exec "$@"
shift
for arg; do shift; [ "$arg" = /data ] && arg="$TEST_DATA"; set -- "$@" "$arg"; done
exec redis-server --port "$TEST_PORT" --bind 127.0.0.1 --protected-mode no --set-proc-title no "$@"
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not on PATH: these checks run the real Redis 7 (apt install redis-server)"
    return path


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) replaced as the kubelet does for a variable the container defines ($$ escapes it)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: env.get(m[1], m[0]) if m[1] else "$", arg)


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = K8S_SECRETS[(ref["name"], ref["key"])]
    return env


def _redis_container(source: str, docker_compose: str, tmp_path: Path) -> tuple[list[str], dict[str, str], list]:
    """(the argv the image's entrypoint gets, the environment, the health checks' argvs)."""
    if source == "compose":
        service = compose_config(docker_compose, tmp_path)["services"]["redis"]
        assert not service.get("entrypoint"), "the image's entrypoint drops root for the redis user"
        test = container_argv(service["healthcheck"]["test"])
        assert test[0] == "CMD-SHELL", test
        return container_argv(service["command"]), dict(service["environment"]), [["sh", "-c", test[1]]]
    statefulset = next(d for d in rendered(source) if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container, "the image's entrypoint runs first"
    env = _k8s_env(container)
    probes = [container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe") if "exec" in container[p]]
    return [_kubelet_expand(arg, env) for arg in container["args"]], env, probes


def _client(port: int, password: str | None = None) -> redis.Redis:
    # No retries: the start loop polls on its own, and a refused password must fail at once.
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2, retry=Retry(NoBackoff(), 0))


def _cmdlines() -> Iterator[tuple[int, bytes]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes()
            except OSError:  # ended meanwhile
                continue


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """docker-entrypoint.sh and a redis-cli that talks to the test's port, first on PATH."""
    _tool("redis-server")
    folder = tmp_path / "bin"
    folder.mkdir()
    _script(folder / "docker-entrypoint.sh", ENTRYPOINT)
    _script(folder / "redis-cli", f'#!/bin/sh\nexec {_tool("redis-cli")} -p "$TEST_PORT" "$@"\n')
    return folder


@pytest.mark.parametrize("source", ["compose", *overlays()])
def test_redis_starts_with_the_password_on_no_command_line(
    source: str, docker_compose: str, bin_dir: Path, tmp_path: Path
) -> None:
    argv, container_env, probes = _redis_container(source, docker_compose, tmp_path)
    port = _free_port()
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        **container_env,
        "TEST_PORT": str(port),
        "TEST_DATA": str(data),
    }
    assert env["REDIS_PASSWORD"] == TEST_PASSWORD
    secret = TEST_PASSWORD.encode()
    proc = subprocess.Popen(
        [str(bin_dir / "docker-entrypoint.sh"), *argv],
        cwd=data,  # the image's WORKDIR, /data
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        shown: set[str] = set()
        client = _client(port, TEST_PASSWORD)
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while True:  # from the first moment on: the shells, the entrypoint, redis-server
            shown |= {f"{pid}: {line!r}" for pid, line in _cmdlines() if secret in line}
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"Redis exited with {proc.returncode}:\n{proc.stdout.read().decode()}"  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "Redis did not answer"
                time.sleep(0.01)
        shown |= {f"{pid}: {line!r}" for pid, line in _cmdlines() if secret in line}
        assert not shown, f"the password in a process's arguments: {sorted(shown)}"

        # The exec chain ends in redis-server itself: it gets SIGTERM, not a shell.
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"redis-server"), proc.pid
        with pytest.raises(redis.AuthenticationError):
            _client(port).ping()
        with pytest.raises(redis.AuthenticationError):
            _client(port, "not-the-password").ping()
        config = client.config_get("*")
        assert config["requirepass"] == TEST_PASSWORD
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        assert config["maxmemory-policy"] == "noeviction"
        assert Path(config["dir"]).resolve() == data.resolve()

        assert probes, "the container needs a health check that asks Redis"
        for probe in probes:
            ok = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=10, check=False)
            assert ok.returncode == 0, (probe, ok.stdout, ok.stderr)
            no_auth = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"}
            refused = subprocess.run(probe, env=no_auth, capture_output=True, text=True, timeout=10, check=False)
            assert refused.returncode != 0, f"{probe} passes without the password: it does not check Redis"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert (data / "appendonlydir").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("source", ["compose", *overlays()])
def test_redis_does_not_start_without_a_password(
    source: str, docker_compose: str, bin_dir: Path, tmp_path: Path
) -> None:
    """An empty Secret or variable must not give a Redis that anyone on the network may use."""
    argv, container_env, _ = _redis_container(source, docker_compose, tmp_path)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        **container_env,
        "REDIS_PASSWORD": "",
        "TEST_PORT": str(_free_port()),
        "TEST_DATA": str(tmp_path),
    }
    result = subprocess.run(
        [str(bin_dir / "docker-entrypoint.sh"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr, result.stderr
