"""A network namespace of the test's own, with just a loopback: what answers at localhost:6379 there is
up to the test (nothing, or a redis-server it starts), whatever runs on this machine's loopback."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


class Namespace:
    """A network namespace with only its own loopback: what answers at localhost:6379 is up to the test."""

    def __init__(self) -> None:
        self.name = f"mloc-seed-{uuid.uuid4().hex[:8]}"
        self.ip = shutil.which("ip") or "ip"
        done = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"`ip netns add` failed: {done.stderr.strip()}")
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=30)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.ip, "netns", "exec", self.name, *argv], **kwargs)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.ip, "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=60, **kwargs
        )

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2) to give the test a loopback of its own")
    try:
        namespace = Namespace()
    except RuntimeError as exc:
        pytest.skip(f"needs network namespaces (root): {exc}")
    yield namespace
    namespace.delete()
