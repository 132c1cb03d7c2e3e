"""The local cluster helper starts one set of processes, however it is entered."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from mloc.errors import ConfigError
from mloc.localcluster import LocalCluster


def spawned(module: str = "mloc.") -> list[psutil.Process]:
    """This test's child processes running ``module`` (the Redis server of the fixture aside)."""
    return [p for p in psutil.Process().children() if module in " ".join(p.cmdline())]


def listeners() -> list[psutil.Process]:
    return spawned("mloc.worker.listener")


def test_a_cluster_started_before_its_with_block_is_not_started_again(tmp_path: Path, redis_url: str) -> None:
    cluster = LocalCluster(home=tmp_path, workers=1, redis_url=redis_url, log_dir=tmp_path / "logs")
    # Two workers named local-1 would each hand back the other's tasks as held but not run by it.
    with cluster.start(timeout=120) as entered:
        assert entered is cluster
        assert len(listeners()) == 1
        with pytest.raises(ConfigError, match="started already"):
            cluster.start()
        assert len(listeners()) == 1
    assert not cluster.running
    assert listeners() == []


def test_a_start_that_fails_leaves_no_process_behind(tmp_path: Path, redis_url: str) -> None:
    # The second worker refuses its settings and exits: start() raises, and `with` would never reach
    # its __exit__, so start() itself stops the orchestrator and the worker it had started.
    cluster = LocalCluster(
        home=tmp_path,
        workers=2,
        redis_url=redis_url,
        worker_env=[{}, {"MLOC_WORKER_SLOTS": "none"}],
        log_dir=tmp_path / "logs",
    )
    with pytest.raises(ConfigError, match="local-2 exited with code"), cluster:
        pass
    assert spawned() == []
    assert not cluster.running
