"""Turn a task's model source into a local Hugging Face-format folder.

Four kinds of source are understood: a Hugging Face id (from the local HF cache, else downloaded by the
worker unless it is offline: see :mod:`mloc.llm.fetch`), a local folder or ``.gguf`` file, a URL (an
https ``.gguf``, or an s3 ``.gguf`` or model folder, downloaded likewise), and a packaged model: one
shipped inside an installed Python package (the bundled Gemma 3 270M first of all) or one MLOC builds
itself (``mloc-tiny-llama``). GGUF files are converted, and built models built, once into a folder under
the models dir; the conversion holds a file lock and writes to a temporary folder that is renamed into
place, so two processes asking for the same model at once convert it once and never see half of it.
A conversion takes minutes for a real model, so it says what it is doing (see :class:`Preparation`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from mloc.errors import ExecutionError
from mloc.llm.downloads import exclusive
from mloc.llm.fetch import FetchOptions, fetch_hub
from mloc.llm.transfer import CancelCheck, ProgressHook
from mloc.llm.urls import fetch_url
from mloc.spec.base import ModelSource, SourceType
from mloc.spec.packaged import PACKAGED_MODELS, find_packaged

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONVERTED_DIR = "converted"
MARKER = "mloc_source.txt"


def hf_cache_dir() -> Path:
    """Where Hugging Face ids are looked up."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def weights_bytes(path: Path) -> int:
    """Bytes of weight files in a model folder (or one file); the basis of memory estimates."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        if item.is_file() and item.suffix in WEIGHT_SUFFIXES and not item.name.startswith("."):
            total += item.stat().st_size
    return total


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` with ``build(tmp_dir)`` unless it exists, safely against concurrent builders."""
    if (target / MARKER).exists():
        return target
    with exclusive(target.parent / f".{target.name}.lock"):
        if (target / MARKER).exists():
            return target
        # Holding the lock, any other temporary folder is what a killed builder left behind.
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            # mkdtemp makes a private folder; the converted model is meant to be shared.
            tmp.chmod(0o755)
            for item in tmp.rglob("*"):
                item.chmod(0o755 if item.is_dir() else 0o644)
            if target.exists():
                # A folder without the marker is a leftover of a crash before this lock existed.
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# log(message): RunContext.log fits it as it is.
LogHook = Callable[[str], object]


@dataclass(frozen=True)
class Preparation:
    """How converting or building a model tells the task what it does: a log line when it starts, at each
    stage and when it ends; the stage as the task's progress message too; and a cancel check between stages.
    A stage itself (reading a GGUF can take minutes) is not interrupted; a cancel then waits for its end."""

    on_log: LogHook | None = None
    on_progress: ProgressHook | None = None
    check_cancelled: CancelCheck | None = None

    def log(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(message)

    def stage(self, what: str, message: str) -> None:
        if self.check_cancelled is not None:
            self.check_cancelled()
        text = f"preparing {what}: {message}"
        # Logged as well: progress reports are thinned to a few a second, so a quick stage can hide the next,
        # long one from the progress message, while the log keeps every stage with its time.
        self.log(text)
        if self.on_progress is not None:
            # No total: a stage count would read as a percentage and an ETA, which stages cannot promise.
            self.on_progress(0, None, text)


def prepare_once(target: Path, build: Callable[[Path], None], what: str, preparation: Preparation) -> Path:
    """:func:`build_once`, logging when the build starts and how long it took; a folder already built
    (the common case) logs nothing."""

    def logged(tmp: Path) -> None:
        preparation.log(f"preparing {what} for the engines (once per host; it may take minutes)")
        started = time.perf_counter()
        build(tmp)
        preparation.log(f"prepared {what} in {time.perf_counter() - started:.1f}s")

    return build_once(target, logged)


def _gguf_flag(gguf: Path, key: str) -> bool | None:
    """A boolean from a GGUF file's metadata, or None when it is absent or unreadable."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(gguf).fields.get(key)
        return None if field is None else bool(field.contents())
    except (ImportError, OSError, ValueError):
        return None


def convert_gguf(
    gguf: Path, out: Path, *, stop_token_ids: tuple[int, ...] = (), preparation: Preparation | None = None
) -> None:
    """Dequantize a GGUF causal LM into an HF folder (bf16 safetensors + tokenizer) at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prep = preparation or Preparation()
    # local_files_only rather than HF_HUB_OFFLINE in the environment, which says whether the worker downloads.
    # The stages stay outside the try: a cancel is not a GGUF that could not be read.
    prep.stage(gguf.stem, "reading the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:
        raise ExecutionError(f"could not read the GGUF model {gguf}: {exc}") from exc
    prep.stage(gguf.stem, "reading and dequantizing the weights (the longest stage)")
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:
        raise ExecutionError(f"could not read the GGUF model {gguf}: {exc}") from exc
    # save_pretrained refuses a quantized model; the weights are already dequantized in memory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    prep.stage(gguf.stem, "writing the Hugging Face folder")
    model = model.to(torch.bfloat16)
    if stop_token_ids:
        eos = model.generation_config.eos_token_id
        current = [eos] if isinstance(eos, int) else list(eos or [])
        model.generation_config.eos_token_id = list(dict.fromkeys([*current, *stop_token_ids]))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    add_bos = _gguf_flag(gguf, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        # transformers' GGUF reader drops add_bos_token; Gemma without its <bos> produces junk.
        tokenizer = AutoTokenizer.from_pretrained(out, add_bos_token=add_bos, local_files_only=True)
        tokenizer.save_pretrained(out)
    (out / MARKER).write_text(f"{gguf}\n", encoding="utf-8")


def _gguf_folder(gguf: Path, models_dir: Path, name: str, preparation: Preparation) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = models_dir / CONVERTED_DIR / f"{name}-{digest}"
    return prepare_once(
        target,
        lambda tmp: convert_gguf(gguf, tmp, preparation=preparation),
        f"GGUF model {gguf}",
        preparation,
    )


def _check_folder(path: Path, identifier: str) -> Path:
    if not (path / "config.json").is_file():
        raise ExecutionError(
            f"model {identifier!r}: {path} has no config.json; point model.source.identifier at a "
            "Hugging Face model folder (config.json, weights, tokenizer) or a .gguf file"
        )
    return path


def _resolve_local(identifier: str, models_dir: Path, preparation: Preparation) -> Path:
    path = Path(identifier).expanduser()
    if not path.exists():
        raise ExecutionError(
            f"model {identifier!r} not found: no such file or folder {path.resolve()}; "
            "give an existing folder or .gguf file, or use source.type huggingface or package"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ExecutionError(
                f"model {identifier!r}: {path} is a file but not a .gguf; give a model folder or a .gguf file"
            )
        return _gguf_folder(path, models_dir, path.stem, preparation)
    return _check_folder(path, identifier)


def _from_hf_cache(identifier: str, revision: str | None) -> Path | None:
    """The snapshot folder of a hub id in the local Hugging Face cache (the admin's), or None."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # no engine library here to have filled a cache
        return None

    try:
        folder = snapshot_download(identifier, revision=revision, local_files_only=True, cache_dir=hf_cache_dir())
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except HFValidationError as exc:
        raise ExecutionError(f"model {identifier!r} is not a valid Hugging Face id: {exc}") from exc
    return Path(folder)


def _resolve_huggingface(
    identifier: str, revision: str | None, models_dir: Path, options: FetchOptions, hooks: Hooks
) -> Path:
    if Path(identifier).expanduser().is_dir():
        return _check_folder(Path(identifier).expanduser(), identifier)
    cached = _from_hf_cache(identifier, revision)
    if cached is not None:
        return _check_folder(cached, identifier)
    try:
        folder = fetch_hub(identifier, revision, models_dir, options, **hooks)
    except ExecutionError as exc:
        if options.offline:
            raise ExecutionError(f"{exc.message} (the local Hugging Face cache looked in: {hf_cache_dir()})") from exc
        raise
    return _check_folder(folder, identifier)


def _resolve_url(url: str, models_dir: Path, options: FetchOptions, hooks: Hooks, preparation: Preparation) -> Path:
    fetched = fetch_url(url, models_dir, options, **hooks)
    if fetched.is_file():
        # Converted inside the download's own entry, so evicting the download takes the conversion too.
        return prepare_once(
            fetched.parent / f"hf-{fetched.stem}",
            lambda tmp: convert_gguf(fetched, tmp, preparation=preparation),
            f"GGUF model {url.split('?', 1)[0]}",
            preparation,
        )
    return _check_folder(fetched, url)


def _resolve_package(identifier: str, models_dir: Path, preparation: Preparation) -> Path:
    packaged = find_packaged(identifier)
    if packaged is None:
        known = ", ".join(model.aliases[0] for model in PACKAGED_MODELS)
        raise ExecutionError(f"packaged model {identifier!r} is unknown; known packaged models: {known}")
    if importlib.util.find_spec(packaged.module) is None:
        raise ExecutionError(
            f"packaged model {identifier!r} needs the Python package {packaged.distribution!r}, which this "
            f"worker lacks; pip install {packaged.distribution}"
        )
    module = importlib.import_module(packaged.module)
    target = models_dir / CONVERTED_DIR / packaged.name

    def build(tmp: Path) -> None:
        if packaged.kind == "build":
            preparation.stage(packaged.name, "building it")
            module.build_builtin(tmp)
            (tmp / MARKER).write_text(f"built by {packaged.module}\n", encoding="utf-8")
            return
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=models_dir) as scratch:
            preparation.stage(packaged.name, f"assembling its GGUF file from {packaged.distribution}")
            gguf = Path(module.assemble(Path(scratch) / f"{packaged.name}.gguf"))
            convert_gguf(gguf, tmp, stop_token_ids=packaged.stop_token_ids, preparation=preparation)

    return prepare_once(target, build, f"packaged model {packaged.name}", preparation)


class Hooks(TypedDict, total=False):
    """What a caller may pass to follow a download: progress in bytes, and a check that stops it."""

    on_progress: ProgressHook | None
    check_cancelled: CancelCheck | None


def resolve_model(
    source: ModelSource,
    models_dir: Path,
    *,
    options: FetchOptions | None = None,
    on_progress: ProgressHook | None = None,
    check_cancelled: CancelCheck | None = None,
    on_log: LogHook | None = None,
) -> Path:
    """A local HF-format folder for ``source``; raises :class:`ExecutionError` saying where it looked.

    Hub ids and URLs this host lacks are downloaded first (unless the worker is offline), reporting
    ``on_progress(done_bytes, total_bytes, message)`` and calling ``check_cancelled`` between chunks;
    ``options`` defaults to the worker's settings (:meth:`FetchOptions.from_environment`). A GGUF to
    convert or a packaged model to build logs ``on_log(message)`` when it starts and ends, reports its
    stages to ``on_progress`` and calls ``check_cancelled`` between them."""
    models_dir.mkdir(parents=True, exist_ok=True)
    preparation = Preparation(on_log=on_log, on_progress=on_progress, check_cancelled=check_cancelled)
    if source.type == SourceType.PACKAGE:
        return _resolve_package(source.identifier, models_dir, preparation)
    if source.type == SourceType.LOCAL:
        return _resolve_local(source.identifier, models_dir, preparation)
    options = options or FetchOptions.from_environment()
    hooks = Hooks(on_progress=on_progress, check_cancelled=check_cancelled)
    if source.type == SourceType.URL:
        return _resolve_url(source.identifier, models_dir, options, hooks, preparation)
    return _resolve_huggingface(source.identifier, source.revision, models_dir, options, hooks)


def stop_token_ids_for(source: ModelSource) -> tuple[int, ...]:
    """Stop ids a source needs beyond its tokenizer's eos (only packaged models declare any)."""
    if source.type == SourceType.PACKAGE:
        packaged = find_packaged(source.identifier)
        return packaged.stop_token_ids if packaged else ()
    return ()
