"""The transformers engine: the documented fallback where vLLM is not installed, and the reference the
vLLM path is checked against. LoRA adapters are applied with PEFT, one adapter per call."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError
from mloc.llm import text
from mloc.llm.base import Generation, Samplings, TokenizerEngine, generate_by_group
from mloc.spec.sampling import NO_SEED, Sampling


def _adapter_name(path: Path) -> str:
    stat = (path / "adapter_config.json").stat()
    key = f"{path.resolve()}:{stat.st_mtime_ns}"
    return "a" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _cancel_criteria(event: threading.Event) -> Any:
    """A stopping criterion that ends every row of a batch once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


class TransformersEngine(TokenizerEngine):
    """A causal LM loaded with ``AutoModelForCausalLM``; generates a batch with left padding."""

    name = "transformers"

    def __init__(
        self,
        model_id: str,
        path: Path,
        *,
        dtype: str | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model_id
        self.path = path
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 matmuls are slow on CPUs without AMX/AVX512-BF16, so CPUs default to fp32.
        torch_dtype: Any = getattr(torch, dtype) if dtype and dtype != "auto" else None
        if torch_dtype is None:
            torch_dtype = "auto" if self.device == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ExecutionError(f"model {model_id!r}: transformers could not load {path}: {exc}") from exc
        self.model: Any = model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        self.eos_ids = text.eos_ids(self.tokenizer, self.model.generation_config, stop_token_ids)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id: int = self.tokenizer.pad_token_id
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = getattr(text_config, "max_position_embeddings", None)
        self.memory_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self._peft: Any = None
        self._adapters: set[str] = set()

    def _model_for(self, adapter: Path | None) -> Any:
        """The model to generate with: the base, or the PEFT wrapper with ``adapter`` active."""
        if adapter is None:
            return self.model
        from peft import PeftModel

        name = _adapter_name(adapter)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, adapter, adapter_name=name)
                self._peft.eval()
            elif name not in self._adapters:
                self._peft.load_adapter(adapter, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ExecutionError(
                f"adapter {adapter} does not fit model {self.model_id!r}: {exc}; "
                "use an adapter trained on this base model"
            ) from exc
        self._adapters.add(name)
        self._peft.set_adapter(name)
        return self._peft

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Samplings,
        *,
        adapter: Path | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Generation]]:
        # One ``model.generate`` takes one set of generation settings: a batch per distinct sampling.
        return generate_by_group(
            prompts, sampling, lambda group, shared: self._generate(group, shared, adapter, cancel), cancel
        )

    def _generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: Path | None, cancel: threading.Event | None
    ) -> list[list[Generation]]:
        import contextlib

        import torch

        encoded = [text.encode(self.tokenizer, prompt) for prompt in prompts]
        # Each prompt is repeated n times, so greedy and sampled n > 1 take the same path.
        rows = [ids for ids in encoded for _ in range(sampling.n)]
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(self.device)
        sample = sampling.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "do_sample": sample,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
        }
        if sample:
            # Explicit values so a model's own generation defaults (Gemma's top_k=64) do not leak in.
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if cancel is not None:
            kwargs["stopping_criteria"] = _cancel_criteria(cancel)
        model = self._model_for(adapter)
        # A PEFT wrapper that holds adapters must be told to step aside for a base-model call.
        bypass = (
            self._peft.disable_adapter() if adapter is None and self._peft is not None else contextlib.nullcontext()
        )
        if sampling.seed is not None and sampling.seed != NO_SEED:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode(), bypass:
            output = model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        results: list[list[Generation]] = []
        for row, ids in enumerate(rows):
            if row % sampling.n == 0:
                results.append([])
            results[-1].append(self._finish(row // sampling.n, len(ids), output[row, width:].tolist(), sampling))
        return results

    def _finish(self, index: int, prompt_tokens: int, generated: list[int], sampling: Sampling) -> Generation:
        """Trim one row of generated ids to its real end and say why it ended."""
        end = next((pos for pos, token in enumerate(generated) if token in self.eos_ids), None)
        if end is not None:
            kept, used, reason = generated[:end], end + 1, "stop"
        else:
            # A row stopped by a stop string is padded after it; the padding is not completion.
            used = len(generated)
            while used and generated[used - 1] == self.pad_id:
                used -= 1
            kept, reason = generated[:used], "length" if used >= sampling.max_tokens else "stop"
        output = str(self.tokenizer.decode(kept, skip_special_tokens=True))
        output, stopped = text.cut_at_stop(output, sampling.stop)
        if stopped:
            reason = "stop"
        return Generation(index, output, reason, prompt_tokens, used)

    def close(self) -> None:
        self.model = None
        self._peft = None
        import gc

        gc.collect()
