"""mloc.checkpoints: which checkpoint a later run of a training task starts from."""

from __future__ import annotations

from pathlib import Path

from mloc import checkpoints


def _checkpoint(folder: Path, step: int, *files: str) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}")
    return path


def test_the_newest_complete_checkpoint_is_chosen_by_step_not_by_name(tmp_path: Path) -> None:
    assert checkpoints.newest(tmp_path / "absent") is None
    _checkpoint(tmp_path, 9, checkpoints.TRAINER_STATE)
    ten = _checkpoint(tmp_path, 10, checkpoints.TRAINER_STATE)  # "checkpoint-10" sorts before "-9" as text
    _checkpoint(tmp_path, 12)  # cut short by a crash: its state file was never written
    (tmp_path / "checkpoint-13").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.newest(tmp_path) == (10, ten)


def test_a_checkpoint_must_hold_every_file_asked_for(tmp_path: Path) -> None:
    value = "value_model/config.json"
    with_value = _checkpoint(tmp_path, 4, checkpoints.TRAINER_STATE, value)
    _checkpoint(tmp_path, 8, checkpoints.TRAINER_STATE)
    assert checkpoints.newest(tmp_path)[0] == 8  # type: ignore[index]
    assert checkpoints.newest(tmp_path, needs=(checkpoints.TRAINER_STATE, value)) == (4, with_value)


def test_the_checkpoints_newer_than_the_one_chosen_say_why_they_are_passed_over(tmp_path: Path) -> None:
    value = "value_model/config.json"
    assert checkpoints.passed_over(tmp_path / "absent", None) == []
    _checkpoint(tmp_path, 4, checkpoints.TRAINER_STATE, value)
    _checkpoint(tmp_path, 12)
    _checkpoint(tmp_path, 8, checkpoints.TRAINER_STATE)
    _checkpoint(tmp_path, 2)  # older than the one chosen: not in the way
    (tmp_path / "checkpoint-9.damaged").mkdir()  # set aside already, and said so then
    assert checkpoints.passed_over(tmp_path, 8) == [
        "checkpoint-12 is passed over: it has no trainer_state.json, so it was cut short while it was saved"
    ]
    assert checkpoints.passed_over(tmp_path, 4, needs=(checkpoints.TRAINER_STATE, value)) == [
        "checkpoint-8 is passed over: it has no value_model/config.json, so it was cut short while it was saved",
        "checkpoint-12 is passed over: it has no trainer_state.json, value_model/config.json, "
        "so it was cut short while it was saved",
    ]
    assert len(checkpoints.passed_over(tmp_path, None)) == 2  # none complete: every incomplete one is named
