"""A results volume that is full: the task fails saying so, leaves no partial file, and the worker goes on.

A hung executor's timeout is covered by tests/test_fleet.py::test_a_task_past_its_timeout_is_stopped_and_fails
(both a polite and a signal-ignoring executor process); a worker cut off from the network is requeued in
tests/test_multihost.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster
from tests.reliability.conftest import FAULT_ENV, tmpfs
from tests.support.api import wait_until


def test_full_results_volume_fails_the_task_cleanly_and_the_worker_goes_on(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "tiny-volume", "64k") as volume:
        cluster = make_cluster(1, env=FAULT_ENV, worker_env=[{"RESULTS_DIR": str(volume)}])
        client = client_for(cluster)
        big = client.submit(json.dumps({"taskType": "echo", "payload": "x" * 200_000}).encode())
        failed = wait_until(client, big["task_id"], lambda r: r["state"] in ("succeeded", "failed"), 30)
        assert failed["state"] == "failed", failed
        assert "No space left on device" in failed["reason"], failed["reason"]  # ENOSPC, in words
        assert failed["reason"].startswith(f"cannot write results to {volume / big['task_id']}")
        # Nothing half-written is left where a reader would find it, in the folder or in Redis.
        folder = volume / big["task_id"]
        assert not folder.exists() or list(folder.iterdir()) == []
        with pytest.raises(ApiError) as no_result:
            client.result(big["task_id"])
        assert no_result.value.status_code == 404
        assert cluster.worker_procs["local-1"].poll() is None

        small = client.submit(b"taskType: echo\npayload: {answer: 42}\n")
        done = wait_until(client, small["task_id"], lambda r: r["state"] in ("succeeded", "failed"), 30)
        assert done["state"] == "succeeded", done
        assert json.loads((volume / small["task_id"] / "responses.json").read_text())["payload"] == {"answer": 42}
        assert client.worker("local-1")["free"]["slots"] == 4
        cluster.stop()


@pytest.mark.extra("inference")
def test_a_dataset_task_whose_lines_do_not_fit_when_joined_fails_saying_so_and_a_resume_joins_them(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    rows = 200
    data = tmp_path / "rows.jsonl"  # long ids make long lines: the chunks' fit, the joined copy does not
    data.write_text(
        "".join(json.dumps({"qid": f"{i:04d}" + "x" * 300, "prompt": f"Say {i}:"}) + "\n" for i in range(rows))
    )
    spec = {"taskType": "inference", "model": {"source": {"type": "package", "identifier": "mloc-tiny-llama"},
            "engine": "transformers"}, "inference": {"max_tokens": 1, "batch_size": 50,
            "input": {"path": str(data), "chunk_rows": 100, "columns": {"id": "qid"}}}}  # fmt: skip
    with tmpfs(tmp_path / "volume", "120k") as volume:
        cluster = make_cluster(
            1, env=FAULT_ENV | {"RESULTS_DIR": str(volume)}, worker_env=[{"RESULTS_DIR": str(volume)}]
        )
        client = client_for(cluster)
        task_id = client.submit({"spec": spec})["task_id"]
        failed = wait_until(client, task_id, lambda r: r["state"] in ("succeeded", "failed"), 300)
        assert failed["state"] == "failed", failed
        assert failed["reason"].startswith(f"its {rows} rows, all done, could not be joined into {volume / task_id}")
        assert (
            "No space left on device" in failed["reason"] and f"`mloc resume {task_id}` joins them" in failed["reason"]
        )
        assert failed["progress"]["message"].startswith(f"{rows} rows done"), failed["progress"]
        assert not (volume / task_id / "results.jsonl").exists()  # nothing half-joined where a reader looks
        subprocess.run(["mount", "-o", "remount,size=4m", str(volume)], check=True)
        client.resume(task_id)
        done = wait_until(client, task_id, lambda r: r["state"] in ("succeeded", "failed"), 300)
        assert done["state"] == "succeeded", done
        lines = [json.loads(line) for line in (volume / task_id / "results.jsonl").read_text().splitlines()]
        assert [line["id"][:4] for line in lines] == [f"{i:04d}" for i in range(rows)]
        # Its folder deleted by hand: the answer says so, not that another host holds it.
        subprocess.run(["rm", "-r", str(volume / task_id)], check=True)
        with pytest.raises(ApiError) as gone:
            client.result_lines(task_id).__next__()
        assert gone.value.status_code == 404
        assert f"task {task_id} has no files in this orchestrator's RESULTS_DIR ({volume}), where they were written: " \
            "its folder was deleted there" in gone.value.message, gone.value.message  # fmt: skip
        cluster.stop()
