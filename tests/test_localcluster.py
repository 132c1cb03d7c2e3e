"""The local cluster helper starts one set of processes, however it is entered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from mloc.errors import ConfigError
from mloc.localcluster import LocalCluster


def mloc_children(module: str = "mloc.") -> dict[int, str]:
    """This process's children running ``module`` (the fixtures' Redis servers aside), by pid."""
    found = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            found[child.pid] = " ".join(child.cmdline())
    return {pid: command for pid, command in found.items() if module in command}


@pytest.fixture
def spawned() -> Callable[[str], list[str]]:
    """The command lines of the processes running ``module`` started since the test began (a whole-suite
    run keeps other clusters of its fixtures alive meanwhile)."""
    before = set(mloc_children())
    return lambda module: [command for pid, command in mloc_children(module).items() if pid not in before]


def test_a_cluster_started_before_its_with_block_is_not_started_again(
    tmp_path: Path, redis_url: str, spawned: Callable[[str], list[str]]
) -> None:
    cluster = LocalCluster(home=tmp_path, workers=1, redis_url=redis_url, log_dir=tmp_path / "logs")
    # Two workers named local-1 would each hand back the other's tasks as held but not run by it.
    with cluster.start(timeout=120) as entered:
        assert entered is cluster
        assert len(spawned("mloc.worker.listener")) == 1
        with pytest.raises(ConfigError, match="started already"):
            cluster.start()
        assert len(spawned("mloc.worker.listener")) == 1
    assert not cluster.running
    assert spawned("mloc.") == []


def test_a_start_that_fails_leaves_no_process_behind(
    tmp_path: Path, redis_url: str, spawned: Callable[[str], list[str]]
) -> None:
    # The second worker refuses its settings and exits: start() raises, and `with` would never reach
    # its __exit__, so start() itself stops the orchestrator and the worker it had started.
    cluster = LocalCluster(
        home=tmp_path,
        workers=2,
        redis_url=redis_url,
        worker_env=[{}, {"MLOC_WORKER_SLOTS": "none"}],
        log_dir=tmp_path / "logs",
    )
    with pytest.raises(ConfigError, match="local-2 exited with code") as refused, cluster:
        pass
    # Its own error line is quoted, before where its log is.
    assert "MLOC_WORKER_SLOTS" in refused.value.message.split("; see ")[0], refused.value.message
    assert spawned("mloc.") == []
    assert not cluster.running
