"""bench/gpu.py: the skip on machines without a GPU, the task documents it submits, and its figure helpers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu
from mloc.executors.train.datasets import load_data
from mloc.spec import validate
from mloc.spec.base import Engine, SourceType
from mloc.spec.inference import InferenceSpec
from mloc.spec.train import DatasetFormat, SFTSpec

ROOT = Path(__file__).resolve().parents[2]
# What nvidia-smi prints on a two-GPU machine, as it prints it.
SMI_LIST = (
    "GPU 0: NVIDIA H200 (UUID: GPU-3f1c2a9e-0b1d-4c55-9a7e-2d6f0e8b1a11)\n"
    "GPU 1: NVIDIA H200 (UUID: GPU-7a2b4c6d-8e9f-4a1b-b2c3-d4e5f6a7b8c9)\n"
)


def fake_smi(folder: Path, output: str, code: int = 0) -> Path:
    """A stand-in for the NVIDIA driver's tool, which this machine lacks: prints ``output``, exits ``code``."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    # Shell builtins only: PATH holds nothing but this folder.
    lines = "".join(f"printf '%s\\n' '{line}'\n" for line in output.splitlines())
    tool.write_text(f"#!/bin/sh\n{lines}exit {code}\n", encoding="utf-8")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return folder


def run_script(
    tmp_path: Path, path_dirs: list[Path], *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    full_env = {**os.environ, "PATH": os.pathsep.join(map(str, path_dirs)), "TMPDIR": str(scratch), **(env or {})}
    full_env["MLOC_HOME"] = str(tmp_path / "home")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    # Nothing started: no cluster home, no temporary folder.
    assert not (tmp_path / "home").exists()
    assert list(scratch.iterdir()) == []
    return done, elapsed


def test_without_nvidia_smi_the_script_skips_at_once_and_exits_0(tmp_path: Path) -> None:
    done, elapsed = run_script(tmp_path, [tmp_path / "empty"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{gpu.SKIP} nvidia-smi is not on PATH (no NVIDIA driver on this machine)"]
    assert elapsed < 10


def test_nvidia_smi_without_devices_skips_with_its_answer(tmp_path: Path) -> None:
    tools = fake_smi(tmp_path / "bin", "No devices were found\n", code=6)
    done, elapsed = run_script(tmp_path, [tools])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{gpu.SKIP} nvidia-smi lists no GPUs (No devices were found)"]
    assert elapsed < 10


def test_gpus_listed_but_torch_without_cuda_skips_naming_torch(tmp_path: Path) -> None:
    import torch

    tools = fake_smi(tmp_path / "bin", SMI_LIST)
    # Hides any GPU torch could find, so the answer is the same on a machine with one.
    done, _ = run_script(tmp_path, [tools], env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{gpu.SKIP} torch {torch.__version__} cannot use CUDA (CUDA_VISIBLE_DEVICES='')"
    ]


def test_a_bad_flag_is_refused_before_anything_runs(tmp_path: Path) -> None:
    done, _ = run_script(tmp_path, [tmp_path / "empty"], "--steps", "0")
    assert done.returncode == 2
    assert "--steps must be at least 1" in done.stderr


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_every_task_document_passes_mlocs_validator(tmp_path: Path, gpus: int) -> None:
    data = gpu.write_dataset(tmp_path / "data")
    checks = gpu.documents("gemma3-270m", gpus, data, prompt_count=12, max_tokens=64, steps=20)
    names = [name for name, _ in checks]
    expected_tp = ["inference-vllm-tp1", "inference-vllm-tp2"] if gpus >= 2 else ["inference-vllm-tp1"]
    assert names == [*expected_tp, "sft-lora", "sft-qlora"]
    for name, body in checks:
        document = validate(json.loads(json.dumps(body)))
        spec = document.spec
        if isinstance(spec, InferenceSpec):
            assert spec.model is not None and spec.model.engine == Engine.VLLM
            tp = int(name.removeprefix("inference-vllm-tp"))
            assert spec.model.vllm.tensor_parallel_size == tp
            assert spec.resources.hardware.gpu.count == tp
            assert len(spec.inference.prompts) == 12 and spec.inference.max_tokens == 64
        else:
            assert isinstance(spec, SFTSpec)
            assert spec.model.adapter is not None and spec.model.adapter.type.value == name.removeprefix("sft-")
            assert spec.resources.hardware.gpu.count == 1
            assert spec.hyperparameters.max_steps == 20
            # The file the worker reads passes MLOC's own training-data checks.
            loaded = load_data(spec.dataset, (DatasetFormat.PROMPT_COMPLETION,), seed=1)
            assert len(loaded.train) == 256
            assert loaded.train[0] == {"prompt": "Question: What is 3 plus 5?\nAnswer:", "completion": " 8."}


def test_model_flag_picks_the_source_type(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    cases = {
        "gemma-3-270m": SourceType.PACKAGE,
        "google/gemma-3-1b-pt": SourceType.HUGGINGFACE,
        str(folder): SourceType.LOCAL,
        "https://example.com/models/tiny.gguf": SourceType.URL,
    }
    data = gpu.write_dataset(tmp_path / "data", rows=4)
    for model, kind in cases.items():
        for _, body in gpu.documents(model, 1, data, prompt_count=1, max_tokens=8, steps=1):
            spec = validate(body).spec
            assert isinstance(spec, InferenceSpec | SFTSpec) and spec.model is not None
            assert spec.model.source.type == kind, model


def test_nvidia_smi_outputs_parse() -> None:
    assert gpu.parse_gpu_list(SMI_LIST) == ["NVIDIA H200", "NVIDIA H200"]
    assert gpu.parse_gpu_list("No devices were found\n") == []
    assert gpu.parse_memory_used("0, 81234\n1, 17\n") == {0: 81234, 1: 17}
    assert gpu.parse_memory_used("0, 512 MiB\n") == {0: 512}
    with pytest.raises(ValueError, match="expected 'index, MiB used' per GPU"):
        gpu.parse_memory_used("No devices were found\n")


def test_peak_sampler_keeps_the_highest_total_and_per_gpu_use(tmp_path: Path) -> None:
    reading = tmp_path / "memory.csv"

    def show(text: str) -> None:
        # Replaced whole, so the sampler never reads half a file.
        (tmp_path / "next.csv").write_text(text, encoding="utf-8")
        os.replace(tmp_path / "next.csv", reading)

    show("0, 100\n1, 50\n")
    command = [sys.executable, "-c", "import sys; print(open(sys.argv[1]).read(), end='')", str(reading)]
    with gpu.PeakSampler(command, interval=0.01) as sampler:
        for text in ("0, 900\n1, 40\n", "0, 10\n1, 300\n", "0, 10\n1, 10\n"):
            seen = sampler.samples
            deadline = time.monotonic() + 30
            while sampler.samples < seen + 2:
                assert time.monotonic() < deadline, "the sampler stopped sampling"
                time.sleep(0.01)
            show(text)
    assert sampler.error is None
    assert sampler.peak_mib == 940
    assert sampler.peak_by_gpu == {0: 900, 1: 300}


def test_peak_sampler_records_why_it_could_not_read(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('No devices were found')"]
    with gpu.PeakSampler(command, interval=0.01) as sampler:
        pass
    assert sampler.samples == 0
    assert sampler.error is not None and "expected 'index, MiB used' per GPU" in sampler.error


def test_figures_from_results_shaped_as_mloc_writes_them() -> None:
    inference = {
        "ok": True,
        "engine": "vllm",
        "dtype": "bfloat16",
        "usage": {"completion_tokens": 32768, "tokens_per_sec": 20480.5, "load_sec": 41.2},
    }
    lora = {"task_type": "sft", "device": "cuda x1 (bf16)", "global_step": 50, "train_samples_per_second": 98.4}
    quant = {"bits": 4, "quant_type": "nf4", "linear4bit_layers": 126, "method": "bitsandbytes"}
    qlora_on_cpu = {**lora, "device": "cpu", "quantization": quant}
    rows = [
        gpu.figures_of("inference-vllm-tp1", {"state": "succeeded"}, inference, 75.25, 128_000),
        gpu.figures_of("sft-lora", {"state": "succeeded"}, lora, 40.0, 6_144),
        gpu.figures_of("sft-qlora", {"state": "succeeded"}, {**lora, "quantization": quant}, 52.5, 4_096),
        gpu.figures_of("sft-qlora", {"state": "succeeded"}, lora, 50.0, 4_096),
        gpu.figures_of("sft-lora", {"state": "succeeded"}, qlora_on_cpu, 50.0, None),
        gpu.figures_of("inference-vllm-tp2", {"state": "failed", "reason": "no worker has 2 GPUs"}, {}, 3.0, 900),
    ]
    assert [row.ok for row in rows] == [True, True, True, False, False, False]
    assert rows[0].rate == 20480.5 and rows[0].unit == "tok/s"
    assert rows[2].detail == "cuda x1 (bf16), 50 steps, 4-bit nf4 (126 layers)"

    table = gpu.format_table(rows).splitlines()
    assert table[0].split() == ["check", "rate", "peak", "GPU", "memory", "wall", "detail"]
    assert table[1].split() == [
        *("inference-vllm-tp1", "20,480.5", "tok/s", "128,000", "MiB", "75.2", "s"),
        *("vllm", "bfloat16,", "32768", "tokens,", "load", "41.2", "s"),
    ]
    assert "98.4 samples/s" in table[2] and "6,144 MiB" in table[2]
    assert table[5].split()[1:4] == ["98.4", "samples/s", "-"]
    assert table[6].endswith("FAILED: no worker has 2 GPUs")
    # Columns line up: every row's rate starts where the header's does.
    column = table[0].index("rate")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in table[1:])

    line = json.loads(gpu.json_line(rows, {"model": "gemma3-270m", "gpus": 2}))
    assert line["bench"] == "gpu" and line["gpus"] == 2
    assert line["checks"][0] == {
        "check": "inference-vllm-tp1",
        "ok": True,
        "rate": 20480.5,
        "unit": "tok/s",
        "peak_gpu_mib": 128000,
        "wall_sec": 75.25,
        "detail": "vllm bfloat16, 32768 tokens, load 41.2 s",
    }


@pytest.mark.slow
@pytest.mark.extra("inference", "train")
def test_run_check_reads_figures_from_real_tasks_and_fails_a_cpu_run(tmp_path: Path) -> None:
    """The same documents with the GPU asks taken out, on the tiny CPU model: the path from cluster to
    figures runs for real here, and a run that never touched a GPU is not counted as a pass."""
    data = gpu.write_dataset(tmp_path / "data", rows=16)
    inference, lora, _ = gpu.documents("mloc-tiny-llama", 1, data, prompt_count=4, max_tokens=8, steps=3)
    for _, body in (inference, lora):
        body["spec"]["resources"] = {}
    inference[1]["spec"]["model"] = {
        "source": {"type": "package", "identifier": "mloc-tiny-llama"},
        "engine": "transformers",
    }

    generated = gpu.run_check(*inference, tmp_path / "models", tmp_path / "work")
    assert generated.rate is not None and generated.rate > 0 and generated.unit == "tok/s"
    assert generated.detail.startswith("transformers float32, 32 tokens, load ")
    assert not generated.ok and generated.peak_gpu_mib is None  # no vLLM, no nvidia-smi here

    trained = gpu.run_check(*lora, tmp_path / "models", tmp_path / "work")
    assert trained.rate is not None and trained.rate > 0 and trained.unit == "samples/s"
    assert trained.detail.startswith("cpu, 3 steps (logs: ")
    assert not trained.ok and trained.wall_sec > 0
