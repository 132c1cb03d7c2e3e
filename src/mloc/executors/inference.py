"""The ``inference`` executor: batch generation with vLLM, or transformers where vLLM is missing.

Loaded engines stay on the executor between tasks (an LRU bounded by memory), so a worker that
already holds a task's model starts generating at once. torch, transformers and vLLM are imported only
when a task runs: the worker imports this module at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.engines import EngineExecutor, adapter_folder
from mloc.llm.text import PLAIN_TURN_STOPS
from mloc.spec.inference import InferenceSpec

if TYPE_CHECKING:
    from mloc.llm.base import Generation, LLMEngine
    from mloc.spec.sampling import InferenceInput, Sampling

# Prompts per engine call when the task sets no batch_size: vLLM schedules a large batch itself; the
# transformers engine pads a batch to its longest prompt, so smaller batches waste less.
DEFAULT_BATCH = {"vllm": 256, "transformers": 16}


@dataclass(frozen=True)
class _Request:
    index: int
    prompt: str
    chat: bool


def _sampling(inputs: InferenceInput, extra_stops: tuple[str, ...] = ()) -> Sampling:
    from mloc.spec.sampling import Sampling

    values = {name: getattr(inputs, name) for name in Sampling.model_fields}
    values["stop"] = [*inputs.stop, *(stop for stop in extra_stops if stop not in inputs.stop)]
    return Sampling.model_validate(values)


class InferenceExecutor(EngineExecutor):
    name = "inference"
    task_types = ("inference",)
    isolation = "process"
    requires = ("torch", "transformers")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        from mloc.llm.loader import available_engines
        from mloc.llm.vllm_engine import vllm_flavour

        engines = available_engines()
        facts: dict[str, Any] = {"engines": engines}
        if "vllm" in engines:
            facts["vllm_device"] = vllm_flavour()
        return facts

    def _engine(self, spec: InferenceSpec, ctx: RunContext, adapter: Path | None) -> LLMEngine:
        from mloc.llm.loader import Workload
        from mloc.llm.vllm_engine import lora_rank

        inputs = spec.inference
        # A dataset's prompts are unknown until read: no workload, so vLLM gets the model's own context, and
        # a vllm-cpu KV cache of one full-context sequence, which many short ones share.
        workload = (
            Workload.of_inference(inputs, inputs.batch_size or DEFAULT_BATCH["vllm"]) if inputs.input is None else None
        )
        rank = lora_rank(adapter) if adapter else None
        return self.engines.engine(spec.model, ctx, lora_rank=rank, workload=workload)

    def _check_context(self, engine: LLMEngine, requests: list[_Request], inputs: InferenceInput) -> None:
        """Raise when max_tokens, or a prompt plus max_tokens, cannot fit the model's context."""
        limit = engine.max_context
        if limit is None:
            return
        if inputs.max_tokens >= limit:
            raise ExecutionError(
                f"inference.max_tokens is {inputs.max_tokens} but model {engine.model_id!r} has a context "
                f"of {limit} tokens (prompt + completion); set max_tokens below {limit}"
            )
        for request in requests:
            count = engine.count_tokens(request.prompt)
            if count + inputs.max_tokens > limit:
                raise ExecutionError(
                    f"prompt {request.index} has {count} tokens; with max_tokens {inputs.max_tokens} that is "
                    f"{count + inputs.max_tokens}, beyond model {engine.model_id!r}'s context of {limit} "
                    "tokens; shorten the prompt or lower max_tokens"
                )

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, InferenceSpec):
            raise ExecutionError(f"the inference executor got a {spec.task_type!r} task")
        inputs = spec.inference
        if inputs.input is not None:
            from mloc.executors.dataset_io import check_reachable

            check_reachable(inputs.input)
        adapter = adapter_folder(spec.model)
        load_started = time.perf_counter()
        engine = self._engine(spec, ctx, adapter)
        load_sec = time.perf_counter() - load_started
        if inputs.input is not None:
            return self._run_dataset(ctx, engine, adapter, load_sec)

        requests = [_Request(index, prompt, False) for index, prompt in enumerate(inputs.prompts)]
        offset = len(requests)
        requests += [
            _Request(offset + index, engine.render_chat(conversation), True)
            for index, conversation in enumerate(inputs.messages)
        ]
        self._check_context(engine, requests, inputs)
        plain_sampling = _sampling(inputs)
        # Without a chat template a reply is plain text after "Assistant:"; the next turn marker ends it.
        chat_sampling = plain_sampling if engine.has_chat_template else _sampling(inputs, PLAIN_TURN_STOPS)
        batch_size = inputs.batch_size or DEFAULT_BATCH.get(engine.name, 16)
        plain = [request for request in requests if not request.chat]
        chats = [request for request in requests if request.chat]
        batches = [
            group[start : start + batch_size] for group in (plain, chats) for start in range(0, len(group), batch_size)
        ]

        items: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        done = 0
        ctx.progress(0, len(requests))
        started = time.perf_counter()
        for batch in batches:
            ctx.check_cancelled()
            sampling = chat_sampling if batch[0].chat else plain_sampling
            generations = engine.generate(
                [request.prompt for request in batch], sampling, adapter=adapter, cancel=ctx.cancel_event
            )
            # A cancel mid-batch cuts the batch short; its partial output is not a result.
            ctx.check_cancelled()
            batch_prompt = batch_completion = 0
            for request, samples in zip(batch, generations, strict=True):
                batch_prompt += samples[0].prompt_tokens
                batch_completion += sum(sample.completion_tokens for sample in samples)
                items.extend(self._items(request.index, samples, inputs.n))
            prompt_tokens += batch_prompt
            completion_tokens += batch_completion
            ctx.add_usage(prompt_tokens=batch_prompt, completion_tokens=batch_completion)
            done += len(batch)
            ctx.progress(done, len(requests))
        latency = time.perf_counter() - started
        items.sort(key=lambda item: (item["index"], item.get("sample", 0)))
        return {
            "ok": True,
            "model": engine.model_id,
            "engine": engine.name,
            "dtype": engine.dtype,
            "items": items,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "latency_sec": round(latency, 4),
                "num_requests": len(requests),
                "load_sec": round(load_sec, 4),
                "tokens_per_sec": round(completion_tokens / latency, 2) if latency > 0 else None,
            },
        }

    @staticmethod
    def _run_dataset(ctx: RunContext, engine: LLMEngine, adapter: Path | None, load_sec: float) -> dict[str, Any]:
        """Rows from ``inference.input``, one line each in results.jsonl; responses.json gets the totals."""
        from mloc.executors.inference_dataset import run_dataset

        spec = ctx.spec
        assert isinstance(spec, InferenceSpec)
        inputs = spec.inference
        batch_size = inputs.batch_size or DEFAULT_BATCH.get(engine.name, 16)

        def generate(prompts: list[str], sampling: Sequence[Sampling]) -> list[list[Generation]]:
            return engine.generate(prompts, sampling, adapter=adapter, cancel=ctx.cancel_event)

        result = run_dataset(ctx, inputs, engine, batch_size, generate)
        result["usage"]["load_sec"] = round(load_sec, 4)
        return result

    @staticmethod
    def _items(index: int, samples: list[Generation], n: int) -> list[dict[str, Any]]:
        items = []
        for number, sample in enumerate(samples):
            item: dict[str, Any] = {
                "index": index,
                "output": sample.output,
                "finish_reason": sample.finish_reason,
                "prompt_tokens": sample.prompt_tokens,
                "completion_tokens": sample.completion_tokens,
            }
            if n > 1:
                item["sample"] = number
            items.append(item)
        return items
