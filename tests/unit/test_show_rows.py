"""What the CLI prints: `mloc show` of a task back in the queue after its worker was lost (nothing of
the lost attempt reads as this wait's; requeues are told apart from its attempts), and `mloc cleanup`."""

from __future__ import annotations

import time

import pytest

from mloc.cli.tasks import _dry_run_lines, _summary


def _rows(record: dict[str, object]) -> dict[str, str]:
    return dict(_summary({"task_id": "t-1", "task_type": "echo", "kind": "task", "topic": "tasks.echo", **record}))


def test_a_requeued_pending_task_shows_its_wait_not_its_lost_run() -> None:
    now = time.time()
    rows = _rows(
        {
            "state": "pending",
            "created_at": now - 60,
            "assigned_at": now - 58,
            "started_at": now - 58,  # the lost attempt's
            "attempts": 2,
            "requeues": 1,
            "max_attempts": 3,
        }
    )
    assert rows["queued"].endswith(" so far") and "created to" not in rows["queued"]
    assert "ran" not in rows
    assert rows["attempts"] == (
        "1 of 3, and 1 requeue(s) after its worker stopped or was lost, which do not count (2 runs in all)"
    )


def test_a_running_task_shows_its_queue_time_and_run() -> None:
    now = time.time()
    rows = _rows({"state": "running", "worker_id": "w1", "created_at": now - 10, "started_at": now - 4, "attempts": 1})
    assert rows["queued"].endswith("(created to started)")
    assert rows["ran"].endswith(" so far")
    assert rows["attempts"] == "1 of 1"


def test_the_worker_row_says_when_the_worker_holding_the_task_is_silent_or_gone() -> None:
    running = {"state": "running", "worker_id": "w1", "created_at": time.time(), "attempts": 1}

    def worker_row(**worker: object) -> str:
        return dict(_summary({"task_id": "t-1", "kind": "task", **running}, worker))["worker"]

    assert worker_row() == "w1"  # not read (gone meanwhile): the id alone
    assert worker_row(status="active", heartbeat_age_sec=40, lost_after_sec=120) == "w1"
    assert worker_row(status="active", heartbeat_age_sec=61, lost_after_sec=120) == (
        "w1 (no heartbeat for 61s: it may be down; if none comes within 2 min of the last, it is declared lost "
        "and the task goes back to the queue)"
    )
    assert worker_row(status="lost", heartbeat_age_sec=200, lost_after_sec=120) == (
        "w1 (lost: the task goes back to the queue)"
    )
    assert worker_row(status="draining", heartbeat_age_sec=1, lost_after_sec=120) == "w1 (draining)"


def test_cleanup_says_what_it_did_in_a_line() -> None:
    from mloc.cli.workers import cleanup_text

    assert cleanup_text({"lost_workers": [], "requeued": [], "failed": [], "forgotten_tasks": 0}) == (
        "no silent worker found"
    )
    report = {"lost_workers": ["w1", "w2"], "requeued": ["a", "b", "c"], "failed": ["d"], "forgotten_tasks": 4}
    assert cleanup_text(report) == (
        "2 worker(s) marked lost (w1, w2): 3 task(s) requeued, 1 task(s) failed; "
        "4 finished task(s) past their retention removed"
    )


def test_a_resumed_training_task_shows_its_wait_and_run_since_its_resume() -> None:
    now = time.time()
    record = {"task_type": "sft", "created_at": now - 100, "resumed_at": now - 10, "attempts": 2, "max_attempts": 2}
    # Waiting again: its first run (started 90 s ago) and the time it sat ended are not this wait's.
    waiting = _rows({**record, "state": "pending", "started_at": now - 90})
    assert waiting["queued"] == "10.0 s so far" and "ran" not in waiting, waiting
    assert waiting["resumed"].endswith("(10 s ago)")
    done = _rows({**record, "state": "succeeded", "started_at": now - 8, "finished_at": now - 2})
    assert done["queued"] == "2.0 s (resumed to started)", done
    assert done["ran"] == "6.0 s since its resume", done


def test_a_requeued_task_waits_from_its_requeue_not_from_its_creation() -> None:
    now = time.time()
    record = {"created_at": now - 60, "requeued_at": now - 6, "attempts": 2, "requeues": 1, "max_attempts": 3}
    running = _rows({**record, "state": "running", "worker_id": "w2", "started_at": now - 4})
    assert running["queued"] == "2.0 s (requeued to started)", running
    waiting = _rows({**record, "state": "pending", "started_at": now - 50})
    assert waiting["queued"] == "6.0 s so far", waiting


def test_show_and_the_dry_run_print_the_memory_estimate_alike() -> None:
    estimate = {
        "explain": "sft on gpu: 9.1 GiB (weights 2.3 GiB, ...)",
        "notes": ["the dataset's lengths are unknown at submit"],
        "warning": "the largest GPU registered has 8 GiB",
        "overridden_by_user": {"gpu_memory_bytes": 16 << 30},
    }
    shown = [row for row in _summary({"task_id": "t-1", "task_type": "sft", "state": "pending", "created_at": 0,
                                      "memory_estimate": estimate}) if row[0].startswith("memory")]  # fmt: skip
    assert shown == [
        ("memory", "sft on gpu: 9.1 GiB (weights 2.3 GiB, ...) (placed by your gpu.memory, 16.0 GiB)"),
        ("memory-note", "the dataset's lengths are unknown at submit"),
        ("memory-warning", "the largest GPU registered has 8 GiB"),
    ]
    answer = {
        "task": {"kind": "SFTTask", "spec": {"taskType": "sft"}},
        "topic": "tasks.sft",
        "memory_estimate": estimate,
    }
    assert _dry_run_lines("t.yaml", answer)[1:] == [f"  {name}: {text}" for name, text in shown]


def test_show_0_prints_none_of_a_result(capsys: pytest.CaptureFixture[str]) -> None:
    from mloc.cli.results import print_result

    record = {"task_id": "t-1", "task_type": "echo", "state": "succeeded"}
    print_result(record, {"ok": True, "payload": "one"}, 0)
    assert capsys.readouterr().out == ""
    print_result(record, {"ok": True, "payload": "one"}, 1)
    assert '"payload": "one"' in capsys.readouterr().out
