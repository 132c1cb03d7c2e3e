"""Local clusters: `mloc up` (everything on this machine) and `mloc run FILE` (one task, throw-away)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from mloc.cli import output, waiting
from mloc.cli.root import app
from mloc.client import Client
from mloc.errors import MlocError
from mloc.settings import get_settings

# Settings that say where the local cluster runs; LocalCluster sets these itself for each process.
_CLUSTER_OWNED = ("MLOC_NODE_TYPE", "MLOC_PORT", "MLOC_HOST", "MLOC_HOME", "MLOC_LOG_FILE")


def passed_settings() -> dict[str, str]:
    """The caller's MLOC_ settings, for the processes `up` and `run` start: LocalCluster starts from an
    environment without them (tests rely on that), but an operator's MLOC_EXECUTOR_PYTHON,
    MLOC_ALLOW_PYTHON_TOOL or MLOC_MODELS_DIR must reach the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLOC_") and k not in _CLUSTER_OWNED}


@app.command()
def up(
    workers: Annotated[int, typer.Option(help="Local workers to start.")] = 1,
    port: Annotated[int | None, typer.Option(help="Orchestrator port (default: MLOC_PORT or 8000).")] = None,
) -> None:
    """Run everything on this machine: Redis (embedded unless REDIS_URL is set), the orchestrator and workers."""
    from mloc.localcluster import LocalCluster

    settings = get_settings()
    cluster = LocalCluster(
        home=settings.home,
        port=port or settings.port,
        workers=workers,
        redis_url=settings.redis_url,
        quiet=False,
        results_dir=settings.results_dir.resolve(),
        env=passed_settings(),
    )
    try:
        cluster.start(timeout=120)
        output.line(
            output.styled("MLOC is up", "green"),
            f"API {cluster.api_url} (dashboard {cluster.api_url}/dashboard, docs /docs), Redis {cluster.redis_url}, "
            f"{workers} worker(s). Ctrl-C stops everything.",
        )
        output.line(f"In another shell: export MLOC_API_URL={cluster.api_url}")
        while all(p.poll() is None for p in [cluster.orchestrator, *cluster.worker_procs.values()] if p):
            time.sleep(0.5)
    except MlocError as exc:
        output.fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@app.command()
def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A mloc/v1 task file.")],
    workers: Annotated[int, typer.Option(help="Local workers to start.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the task.")] = 3600,
    shown: Annotated[int, typer.Option("--show", min=0, help="Results printed at the end.")] = 10,
) -> None:
    """Run one task on a throw-away local cluster and print its result.

    The cluster (embedded Redis, orchestrator, workers) stops when the task ends."""
    from mloc.localcluster import LocalCluster
    from mloc.spec import load

    try:
        load(file.read_bytes())
    except MlocError as exc:
        output.fail(exc)
    settings = get_settings()
    home = Path(tempfile.mkdtemp(prefix="mloc-run-"))
    results = settings.results_dir.resolve()
    env = passed_settings() | {"MLOC_MODELS_DIR": str(settings.resolved_models_dir)}
    cluster = LocalCluster(home=home, workers=workers, results_dir=results, env=env, log_dir=home / "logs")
    with output.err().status("starting Redis, the orchestrator and a worker..."):
        try:
            cluster.start(timeout=120)
        except MlocError as exc:
            cluster.stop()
            output.fail(exc)
    client = Client(cluster.api_url)
    try:
        answer = client.submit(file)
        output.line(
            output.visible(f"submitted task {answer['task_id']} to worker {answer['worker_id']}", one_line=True)
        )
        record = waiting.wait(client, answer["task_id"], timeout=timeout, unschedulable_after=0)
        waiting.report(client, record, shown=shown, results_dir=str(results))
        if record["state"] != "succeeded":
            raise typer.Exit(1)
    except MlocError as exc:
        output.fail(exc, code=1 if isinstance(exc, waiting.Unschedulable) else 2)
    finally:
        client.close()
        cluster.stop()
