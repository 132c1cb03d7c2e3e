"""MLOC across separate hosts: Redis, the orchestrator and two workers each in its own network namespace.

The namespaces hang off one bridge with private addresses (10.231.N.0/24); the test itself, in the root
namespace, talks HTTP to the orchestrator's address like a user on another machine. Cutting a worker's
link (its veth goes down) makes it truly unable to reach Redis: the reaper must declare it lost and the
task must finish on the other worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mloc.client import Client

TOKEN = "multihost-admin-token"
REDIS_PASSWORD = "multihost-redis-password"
HOSTS = {"redis": 1, "orchestrator": 2, "worker-a": 3, "worker-b": 4}


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"mloc{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"`ip netns add` is refused here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _free_subnet() -> int:
    """A third octet N such that 10.231.N.0/24 is not in use on this machine."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    for offset in range(250):
        n = (os.getpid() + offset) % 250 + 1
        if f"10.231.{n}." not in used:
            return n
    raise RuntimeError("no free 10.231.N.0/24 subnet")


@dataclass
class Lan:
    """Namespaces on one bridge; every name carries the test's pid so parallel runs never collide."""

    tag: str
    subnet: int
    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"mlb{self.tag}"

    def ns(self, host: str) -> str:
        return f"mloc{self.tag}-{host}"

    def veth(self, host: str) -> str:
        return f"mv{self.tag}{HOSTS[host]}"

    def addr(self, host: str) -> str:
        return f"10.231.{self.subnet}.{HOSTS[host]}"

    def build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.231.{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in HOSTS:
            ns = self.ns(host)
            _ip("netns", "add", ns)
            _ip("link", "add", self.veth(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", self.veth(host), "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{host}.log", "ab")  # noqa: SIM115 - the process owns it
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLOC_", "REDIS_URL", "WORKER_", "TASK_"))}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv],
            env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[host] = proc
        return proc

    def cut(self, host: str) -> None:
        _ip("link", "set", self.veth(host), "down")

    def mend(self, host: str) -> None:
        _ip("link", "set", self.veth(host), "up")

    def teardown(self) -> None:
        # Workers and orchestrator first, Redis last, so they can shut down cleanly.
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(8)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        for host in HOSTS:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


@pytest.fixture
def lan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lan]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(f"cannot build separate hosts with network namespaces: {reason}")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    network = Lan(tag=str(os.getpid()), subnet=_free_subnet(), workdir=tmp_path)
    try:
        network.build()
        yield network
    finally:
        network.teardown()
        leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert network.ns("redis") not in leftovers, "network namespaces were left behind"


def wait_for(what: str, check: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # the service may still be starting
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout}s (last: {last!r})")


def test_tasks_run_on_workers_on_other_hosts_and_a_cut_off_worker_is_replaced(lan: Lan) -> None:
    redis_url = f"redis://:{REDIS_PASSWORD}@{lan.addr('redis')}:6379/0"
    fast = {
        "HEARTBEAT_TTL_SEC": "3",
        "HEARTBEAT_INTERVAL_SEC": "1",
        "MLOC_REAP_INTERVAL_SEC": "0.5",
        "MLOC_SCHEDULE_INTERVAL_SEC": "0.2",
        "MLOC_SHUTDOWN_GRACE_SEC": "2",
        "REDIS_URL": redis_url,
    }
    lan.start("redis", [shutil.which("redis-server") or "redis-server", "--bind", lan.addr("redis"), "--port", "6379",
                        "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
                        "--dir", str(lan.workdir)])  # fmt: skip
    lan.start(
        "orchestrator",
        [sys.executable, "-m", "mloc.cli", "start", "--node-type", "orchestrator"],
        {**fast, "MLOC_HOST": lan.addr("orchestrator"), "MLOC_PORT": "8000", "ORCHESTRATOR_TOKEN": TOKEN,
         "MLOC_HOME": str(lan.workdir / "orchestrator-home")},
    )  # fmt: skip
    for worker in ("worker-a", "worker-b"):
        lan.start(
            worker,
            [sys.executable, "-m", "mloc.worker.listener"],
            {**fast, "WORKER_ID": worker, "TASK_TOPICS": "tasks.*", "MLOC_WORKER_SLOTS": "2",
             "RESULTS_DIR": str(lan.workdir / worker / "results"), "MLOC_HOME": str(lan.workdir / worker)},
        )  # fmt: skip

    client = Client(f"http://{lan.addr('orchestrator')}:8000", TOKEN)
    try:
        wait_for(
            "both workers registered through the bridge",
            lambda: (
                {w["worker_id"] for w in client.workers()["items"] if w["status"] == "active"}
                == {"worker-a", "worker-b"}
            ),
            45,
        )
        # Short tasks spread over both hosts.
        short = json.dumps({"sleep_sec": 0.5})
        ids = [client.submit(f"taskType: echo\npayload: {i}\nhyperparameters: {short}\n".encode())["task_id"]
               for i in range(4)]  # fmt: skip
        done = [client.wait(task_id, timeout=30) for task_id in ids]
        assert [r["state"] for r in done] == ["succeeded"] * 4, [r.get("reason") for r in done]
        assert {r["worker_id"] for r in done} == {"worker-a", "worker-b"}
        assert [client.result(task_id)["payload"] for task_id in ids] == [0, 1, 2, 3]

        # A long task; its worker loses the network while it runs.
        long = json.dumps({"sleep_sec": 5, "steps": 10})
        task_id = client.submit(f"taskType: echo\nhyperparameters: {long}\n".encode())["task_id"]
        running = wait_for("the long task running", lambda: client.task(task_id)["state"] == "running" and
                           client.task(task_id), 20)  # fmt: skip
        assert isinstance(running, dict)
        cut_off = running["worker_id"]
        other = ({"worker-a", "worker-b"} - {cut_off}).pop()
        cut_at = time.monotonic()
        lan.cut(cut_off)

        lost = wait_for("the cut-off worker declared lost", lambda: client.worker(cut_off)["status"] == "lost", 15)
        assert lost and time.monotonic() - cut_at < 10
        final = client.wait(task_id, timeout=30)
        assert final["state"] == "succeeded", final.get("reason")
        assert final["attempts"] == 2 and final["worker_id"] == other
        assert client.result(task_id)["worker_id"] == other and client.result(task_id)["attempt"] == 2

        # Back on the network, the worker registers again; its stale attempt is not recorded.
        lan.mend(cut_off)
        wait_for("the mended worker active again", lambda: client.worker(cut_off)["status"] == "active", 40)
        time.sleep(1.0)
        after = client.task(task_id)
        assert (after["state"], after["attempts"], after["worker_id"]) == ("succeeded", 2, other)
        assert client.result(task_id)["worker_id"] == other
    finally:
        client.close()
