"""The local cluster helper starts one set of processes, however it is entered."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from mloc.errors import ConfigError
from mloc.localcluster import LocalCluster


def listeners() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "mloc.worker.listener" in " ".join(p.cmdline())]


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
