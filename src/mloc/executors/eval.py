"""The ``eval`` executor: lm-eval-harness on the task's model, loaded as the inference executor loads it.

Custom tasks become lm-eval task configs (YAML in the task's out folder, read through lm-eval's
TaskManager) whose data the ``json``/``csv`` builders of ``datasets`` read from the local file; harness
tasks are taken from lm-eval's own catalogue, their data from the worker's Hugging Face cache. The model
is the transformers engine from the shared engine cache, handed to lm-eval's ``HFLM`` already loaded, so
a warm model is reused and an adapter is applied with PEFT as inference applies it. lm_eval, torch and
transformers are imported only when a task runs.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.engines import EngineExecutor, adapter_folder
from mloc.executors.eval_tasks import check_custom, write_config
from mloc.spec.base import Engine
from mloc.spec.eval import EvalSpec

if TYPE_CHECKING:
    from mloc.llm.hf_engine import TransformersEngine

TASKS_DIR = "lm_eval_tasks"
# What datasets and huggingface_hub raise for data that is neither cached nor downloadable offline.
MISSING_DATA = {"DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "EmptyDatasetError"}
# Keys of an lm-eval result row that are not scores.
NOT_SCORES = {"alias", "name", "sample_len", "samples"}


class EvalExecutor(EngineExecutor):
    name = "eval"
    task_types = ("eval",)
    isolation = "process"
    requires = ("lm_eval", "torch", "transformers")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        # lm-eval's HF model runs on the transformers engine only; the spec refuses model.engine 'vllm'.
        from mloc.executors.eval_data import harness_tasks

        return {"engines": ["transformers"], "harness_tasks": harness_tasks()}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, EvalSpec):
            raise ExecutionError(f"the eval executor got a {spec.task_type!r} task")
        from mloc.executors.dataset_io import libraries_offline

        libraries_offline()
        options = spec.eval
        started = time.perf_counter()
        adapter = adapter_folder(spec.model)
        tasks_dir = ctx.out_dir / TASKS_DIR
        for index, task in enumerate(options.custom):
            check_custom(task, index, options.num_fewshot or 0)
            write_config(task, tasks_dir, options.max_tokens)
        manager = task_manager(tasks_dir if options.custom else None, with_harness=bool(options.tasks))
        for name in options.tasks:
            check_harness(manager, name)
        ctx.log(f"{len(options.custom)} custom and {len(options.tasks)} harness task(s) ready")
        ctx.check_cancelled()

        engine = self._engine(spec, ctx)
        names = [*options.tasks, *(task.name for task in options.custom)]
        with evaluated_model(engine, adapter) as model:
            lm = reporting_lm(model, engine, options.batch_size, ctx)
            evaluating = time.perf_counter()
            results = evaluate(lm, names, manager, spec)
            eval_sec = time.perf_counter() - evaluating
        scores = scores_of(results)
        samples = {
            name: {"rows": int(counts["original"]), "scored": int(counts["effective"])}
            for name, counts in (results.get("n-samples") or {}).items()
        }
        for step, (name, values) in enumerate(scores.items()):
            shown = ", ".join(f"{metric} {value:.4g}" for metric, value in values.items() if value is not None)
            ctx.log(f"{name}: {shown}")
            ctx.metrics(step, **{f"{name}/{metric}": value for metric, value in values.items() if value is not None})
        ctx.add_usage(eval_samples=sum(count["scored"] for count in samples.values()))
        return {
            "ok": True,
            "model": engine.model_id,
            "adapter": str(adapter) if adapter else None,
            "engine": engine.name,
            "dtype": engine.dtype,
            "scores": scores,
            "samples": samples,
            "config": config_of(results, spec),
            # eval_sec: inside lm_eval.simple_evaluate; the rest of latency_sec is MLOC's checks and the model load.
            "usage": {"latency_sec": round(time.perf_counter() - started, 4), "eval_sec": round(eval_sec, 4)},
        }

    def _engine(self, spec: EvalSpec, ctx: RunContext) -> TransformersEngine:
        from mloc.llm.hf_engine import TransformersEngine
        from mloc.llm.loader import default_model_spec

        model = (spec.model or default_model_spec()).model_copy(update={"engine": Engine.TRANSFORMERS})
        engine = self.engines.engine(model, ctx)
        if not isinstance(engine, TransformersEngine):
            raise ExecutionError(f"eval needs the transformers engine for {engine.model_id!r}, got {engine.name}")
        return engine


# --- harness tasks -----------------------------------------------------------------------------------


def task_manager(include: Path | None, *, with_harness: bool) -> Any:
    """lm-eval's TaskManager over the custom configs, and over its own catalogue when harness tasks are
    named (indexing the catalogue takes seconds, so it is skipped otherwise)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None, include_defaults=with_harness)


def check_harness(manager: Any, name: str) -> None:
    """Refuse a name lm-eval does not know, or a task whose data this worker's cache lacks."""
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ExecutionError(
            f"eval.tasks: {name!r} is not an lm-eval task or group; {hint}`lm-eval ls tasks` lists them"
        )
    try:
        manager.load([name])
    except Exception as exc:
        if not data_missing(exc):
            raise ExecutionError(
                f"eval.tasks: harness task {name!r} could not be loaded on this worker: {type(exc).__name__}: {exc}"
            ) from exc
        entry = manager.task_index.get(name)
        config = getattr(entry, "cfg", None) or {}
        dataset = "/".join(str(part) for part in (config.get("dataset_path"), config.get("dataset_name")) if part)
        which = f" (dataset {dataset!r})" if dataset else ""
        raise ExecutionError(
            f"eval.tasks: the data of harness task {name!r}{which} is not in this worker's Hugging Face cache "
            f"({cache_dir()}); workers never download: on a machine with network access and the same HF_HOME run "
            f"python -c \"from lm_eval.tasks import TaskManager; TaskManager().load(['{name}'])\" and copy the "
            f"cache to the worker, or evaluate a custom task from a local file ({type(exc).__name__}: {exc})"
        ) from exc


def data_missing(exc: BaseException) -> bool:
    """Whether loading failed for want of data offline (datasets raises a ConnectionError, or its own
    not-found errors), somewhere along the exception's causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | FileNotFoundError) or type(seen).__name__ in MISSING_DATA:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cache_dir() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


# --- the model ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def evaluated_model(engine: TransformersEngine, adapter: Path | None) -> Iterator[Any]:
    """The engine's model with ``adapter`` active, or the base model. The engine keeps one PEFT wrapper
    for every adapter it has served, whose layers sit in the base model: a base-model run must switch
    them off, as the engine's own generate does."""
    model = engine._model_for(adapter)
    peft = engine._peft
    off = peft.disable_adapter() if adapter is None and peft is not None else contextlib.nullcontext()
    with off:
        yield model


def reporting_lm(model: Any, engine: TransformersEngine, batch_size: int, ctx: RunContext) -> Any:
    """lm-eval's HFLM over the loaded model, reporting each answered request as progress (and stopping
    at a cancel) through its cache hook, which HFLM calls once per request."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class Progress(CacheHook):
        def __init__(self) -> None:
            super().__init__(None)
            self.kind = ""
            self.done = self.total = 0

        def start(self, kind: str, total: int) -> None:
            self.kind, self.done, self.total = kind, 0, total
            ctx.progress(0, total, kind)

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            ctx.check_cancelled()
            self.done += 1
            ctx.progress(self.done, self.total, self.kind)

    class ReportingHFLM(HFLM):
        # lm-eval's progress bars would fill the task's log; the hook reports progress instead.
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            progress.start("scoring choices", len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            progress.start("scoring texts", len(requests))
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            progress.start("generating", len(requests))
            return super().generate_until(requests, disable_tqdm=True)

    progress = Progress()
    lm = ReportingHFLM(pretrained=model, tokenizer=engine.tokenizer, batch_size=batch_size)
    lm.set_cache_hook(progress)
    return lm


def evaluate(lm: Any, names: list[str], manager: Any, spec: EvalSpec) -> dict[str, Any]:
    import lm_eval

    options = spec.eval
    seeds: dict[str, Any] = {}
    if options.seed is not None:
        seeds = {
            name: options.seed
            for name in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
        }
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        task_manager=manager,
        gen_kwargs={"max_gen_toks": options.max_tokens} if options.max_tokens else None,
        log_samples=False,
        **seeds,
    )
    if not results:
        raise ExecutionError("lm-eval returned no results")
    return dict(results)


# --- the result --------------------------------------------------------------------------------------


def scores_of(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value, metric_stderr: value}} from lm-eval's rows ("acc,none", "acc_stderr,none").
    A filter other than lm-eval's "none" is kept in the name ("exact_match/strict-match")."""
    scores: dict[str, dict[str, float | None]] = {}
    for task, row in (results.get("results") or {}).items():
        values: dict[str, float | None] = {}
        for key, value in row.items():
            metric, _, kept = key.partition(",")
            if key in NOT_SCORES or not kept or metric.endswith("_stderr"):
                continue
            name = metric if kept == "none" else f"{metric}/{kept}"
            values[name] = number(value)
            values[f"{name}_stderr"] = number(row.get(f"{metric}_stderr,{kept}"))
        scores[task] = values
    return scores


def number(value: Any) -> float | None:
    """A score as a float; lm-eval writes "N/A" for a standard error it could not compute."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if result == result else None  # NaN is no score


def config_of(results: dict[str, Any], spec: EvalSpec) -> dict[str, Any]:
    """What was run: the options, and per task its data, kind, few-shot count and metrics."""
    shots = results.get("n-shot") or {}
    tasks = {}
    for task, config in (results.get("configs") or {}).items():
        tasks[task] = {
            "dataset": config.get("dataset_path"),
            "dataset_name": config.get("dataset_name"),
            "output_type": config.get("output_type"),
            "num_fewshot": shots.get(task, config.get("num_fewshot")),
            "metrics": [item.get("metric") for item in config.get("metric_list") or [] if isinstance(item, dict)],
        }
        if config.get("output_type") == "generate_until":
            tasks[task]["generation_kwargs"] = config.get("generation_kwargs")
    return {
        **spec.eval.model_dump(mode="json", exclude={"custom", "tasks"}),
        "tasks": tasks,
        "lm_eval_version": results.get("lm_eval_version"),
    }
