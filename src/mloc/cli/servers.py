"""Local clusters: `mloc up` (everything on this machine) and `mloc run FILE` (one task, throw-away)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from mloc.cli import output, waiting
from mloc.cli.root import app
from mloc.client import Client
from mloc.errors import MlocError
from mloc.homelock import HomeInUse, HomeLock, holder_of
from mloc.settings import get_settings
from mloc.state import TaskState

if TYPE_CHECKING:
    from mloc.localcluster import LocalCluster

# Settings that say where the local cluster runs; LocalCluster sets these itself for each process.
_CLUSTER_OWNED = ("MLOC_NODE_TYPE", "MLOC_PORT", "MLOC_HOST", "MLOC_HOME", "MLOC_LOG_FILE")


def passed_settings() -> dict[str, str]:
    """The caller's MLOC_ settings, for the processes `up` and `run` start: LocalCluster starts from an
    environment without them (tests rely on that), but an operator's MLOC_EXECUTOR_PYTHON,
    MLOC_ALLOW_PYTHON_TOOL or MLOC_MODELS_DIR must reach the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLOC_") and k not in _CLUSTER_OWNED}


# Seconds a running task gets to finish when `mloc up` stops, unless MLOC_SHUTDOWN_GRACE_SEC says otherwise:
# a laptop's Ctrl-C should not wait half a minute. A task still running then goes back to the queue.
UP_SHUTDOWN_GRACE_SEC = 3.0
# What the workers get beyond that grace to hand their tasks back and end their executor processes
# before whatever is left is killed.
STOP_MARGIN_SEC = 3.0
# A worker that dies is started again, unless it died more than this often within the window: then
# something about it is broken (a bad setting, no memory at all) and `mloc up` stops, saying so.
WORKER_RESTARTS = 3
WORKER_RESTART_WINDOW_SEC = 60.0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: object) -> None:
    # Only the first stop signal interrupts: a second one (Ctrl-C twice, or a signal sent to a whole
    # process group and passed on) arriving before the stopping began would cut it short.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt  # SIGTERM (or SIGHUP) stops `mloc up` the way Ctrl-C does


def stored_tasks(redis_url: str) -> dict[str, int]:
    """Tasks by state in the cluster's Redis, read before any orchestrator or worker touches them."""
    import asyncio

    from mloc.connection import connect
    from mloc.store import TaskStore

    async def count() -> dict[str, int]:
        redis = await connect(redis_url, attempts=3)
        try:
            return await TaskStore(redis).counts_by_state()
        finally:
            await redis.aclose()

    return asyncio.run(count())


# What becomes of a task whose worker went away with the last run: the restarted worker of that id, or
# the reaper once the old heartbeat expires, hands it back to the queue, or ends a cancel it was asked for.
_AT_RESTART = {"assigned": "queued again", "running": "queued again", "cancelling": "cancelled"}


def restored_text(counts: dict[str, int], where: str) -> str:
    """'restored from WHERE: 12 tasks (3 pending, 1 running → queued again, 8 succeeded)', or a fresh start."""
    total = sum(counts.values())
    if not total:
        return f"fresh start: no tasks in {where}"
    parts = [
        f"{counts[state]} {state}" + (f" → {_AT_RESTART[state]}" if state in _AT_RESTART else "")
        for state in TaskState
        if counts.get(state)
    ]
    return f"restored from {where}: {total} task{'s' if total != 1 else ''} ({', '.join(parts)})"


def _say_up(cluster: LocalCluster, workers: int, token: str | None) -> None:
    from mloc.connection import redact

    api = cluster.api_url
    output.line(
        output.styled("MLOC is up:", "green"),
        f"API {api}, dashboard {api}/dashboard, API docs {api}/docs, Redis {redact(cluster.redis_url or '')}, "
        f"{workers} worker(s). Ctrl-C (or SIGTERM) stops everything.",
    )
    output.line("In another shell:")
    output.line(f"  export MLOC_API_URL={api}")
    if token:
        output.line(f"  export MLOC_TOKEN={shlex.quote(token)}")
    if cluster.redis is not None:
        # A worker started by hand finds the embedded Redis through MLOC_HOME; named, from any home.
        output.line(f"  export REDIS_URL={shlex.quote(cluster.redis_url or '')}   # for a worker: mloc start")


def _exited(cluster: LocalCluster) -> tuple[str | None, int] | None:
    """The worker id (None for the orchestrator) and exit code of a cluster process that has ended."""
    named = [(None, cluster.orchestrator), *cluster.worker_procs.items()]
    for worker_id, proc in named:
        if proc is not None and proc.poll() is not None:
            return worker_id, proc.returncode
    return None


def _supervise(cluster: LocalCluster) -> str:
    """Keep the cluster running until its orchestrator ends, or a worker keeps dying: a worker that
    dies (killed, out of memory) is started again under its id, which hands its tasks back to the
    queue for any worker to take; one asked to stop stays stopped. Returns what ended it."""
    deaths: dict[str, list[float]] = {}
    while True:
        time.sleep(0.5)
        ended = _exited(cluster)
        if ended is None:
            continue
        worker_id, code = ended
        # A process killed by a signal printed nothing of its end; one that exited may have.
        said = " (its output is above)" if code > 0 else ""
        if worker_id is None:
            return f"the orchestrator exited (code {code}){said}"
        if code == 0:
            # Asked to stop (SIGTERM to it alone): it handed its tasks back, and stays stopped.
            cluster.worker_procs.pop(worker_id, None)
            output.error_line(f"worker {worker_id} stopped; the rest run on (`mloc down` stops everything)")
            continue
        now = time.monotonic()
        recent = [at for at in deaths.get(worker_id, []) if now - at < WORKER_RESTART_WINDOW_SEC] + [now]
        deaths[worker_id] = recent
        if len(recent) > WORKER_RESTARTS:
            return (
                f"worker {worker_id} exited (code {code}){said}, {len(recent)} times in {WORKER_RESTART_WINDOW_SEC:g}s"
            )
        output.error_line(
            f"worker {worker_id} exited (code {code}){said}; starting it again: what it ran goes back to the queue"
        )
        cluster.add_worker(worker_id, cluster.worker_env_of(worker_id))


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=0, help="Local workers to start (0: remote workers only).")] = 1,
    port: Annotated[int | None, typer.Option(help="Orchestrator port (default: MLOC_PORT or 8000).")] = None,
) -> None:
    """Run everything on this machine: Redis (embedded unless REDIS_URL is set), the orchestrator and workers.

    One `mloc up` per MLOC_HOME (where the embedded Redis keeps its data): tasks stored by an earlier
    run are there again, and a second `mloc up` on the same home is refused. Ctrl-C or SIGTERM stops
    every process it started; a task still running after MLOC_SHUTDOWN_GRACE_SEC (3 s here) goes back
    to the queue and runs at the next start. A worker that dies is started again (what it ran goes
    back to the queue); one that dies more than 3 times in a minute stops it all."""
    from mloc.connection import redact
    from mloc.localcluster import LocalCluster

    settings = get_settings()
    port = port or settings.port
    try:
        lock = HomeLock(settings.home).acquire(f"http://127.0.0.1:{port}")
    except HomeInUse as exc:
        output.fail(exc)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Set even where SIGINT came ignored (a script's background job): `kill -INT` stops it all the same.
    signal.signal(signal.SIGINT, _raise_interrupt)
    # A closed terminal: stop everything rather than leave the embedded Redis (a session of its own),
    # the orchestrator and the workers running without anyone to stop them.
    signal.signal(signal.SIGHUP, _raise_interrupt)
    grace = settings.shutdown_grace_sec if "MLOC_SHUTDOWN_GRACE_SEC" in os.environ else UP_SHUTDOWN_GRACE_SEC
    cluster = LocalCluster(
        home=settings.home,
        port=port,
        workers=workers,
        redis_url=settings.redis_url,
        quiet=False,
        own_groups=True,
        results_dir=settings.results_dir.resolve(),
        env={"MLOC_SHUTDOWN_GRACE_SEC": str(grace)} | passed_settings(),
    )
    try:
        # Before anything starts: a port in use stops it with one line, not after Redis and a restore.
        cluster.check_port()
    except MlocError as exc:
        lock.release()
        output.fail(exc)
    try:
        redis_url = cluster.start_redis()
        where = str(settings.home) if cluster.redis is not None else f"Redis at {redact(redis_url)}"
        output.line(output.visible(restored_text(stored_tasks(redis_url), where), one_line=True))
        cluster.start(timeout=120)
        _say_up(cluster, workers, settings.admin_token)
        output.error_line(f"{_supervise(cluster)}; stopping the rest")
        raise typer.Exit(1)
    except MlocError as exc:
        output.fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        # Stopping is bounded by its own deadline: a second Ctrl-C or SIGTERM must not cut it short.
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        output.line(f"stopping: running tasks get {grace:g}s to finish, then go back to the queue", stderr=True)
        cluster.stop(grace=grace + STOP_MARGIN_SEC)
        lock.release()
        output.line("MLOC stopped", stderr=True)


@app.command()
def down(
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for it to stop.")] = 60,
) -> None:
    """Stop the `mloc up` running on this MLOC_HOME, as Ctrl-C in its terminal would: running tasks get
    MLOC_SHUTDOWN_GRACE_SEC to finish, then go back to the queue. Returns once everything it started
    has stopped."""
    home = get_settings().home
    found = holder_of(home)
    if found is None:
        output.line(f"no `mloc up` runs on MLOC_HOME {home}: nothing to stop", stderr=True)
        return
    if found.pid is None:
        output.die(f"the `mloc up` on MLOC_HOME {home} is starting and has not said its pid yet; try again")
    try:
        os.kill(found.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # it ended meanwhile
    except PermissionError:
        output.die(f"the `mloc up` on MLOC_HOME {home} (pid {found.pid}) is another user's; stop it as that user")
    deadline = time.monotonic() + timeout
    with output.err().status(f"stopping `mloc up` (pid {found.pid})..."):
        while holder_of(home) is not None:
            if time.monotonic() > deadline:
                output.die(
                    f"`mloc up` (pid {found.pid}) is still stopping after {timeout:g}s; `kill -9 {found.pid}` ends "
                    "it at once (the tasks it ran go back to the queue at its next start)",
                    code=1,
                )
            time.sleep(0.1)
    output.line(f"stopped `mloc up` (pid {found.pid}) on MLOC_HOME {home}")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A mloc/v1 task file.")],
    workers: Annotated[int, typer.Option(min=1, help="Local workers to start.")] = 1,
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
    # Its orchestrator takes this environment's ORCHESTRATOR_TOKEN as its admin's: the client sends it.
    client = Client(cluster.api_url, settings.admin_token)
    succeeded = False
    try:
        answer = client.submit(file)
        output.line(output.visible(f"submitted task {answer['task_id']} {_placed(answer)}", one_line=True))
        if answer.get("unschedulable"):
            raise waiting.Unschedulable(answer["task_id"], answer.get("pending_reason") or "no worker can run it")
        record = waiting.wait(client, answer["task_id"], timeout=timeout, unschedulable_after=0)
        waiting.report(client, record, shown=shown, results_dir=str(results))
        if record["state"] != "succeeded":
            raise typer.Exit(1)
        succeeded = True
    except waiting.Unschedulable as exc:
        _no_worker_here(exc, file)
    except MlocError as exc:
        output.fail(exc)
    finally:
        client.close()
        cluster.stop()
        # The results stay in RESULTS_DIR; the cluster's Redis and logs go, unless they may tell why it failed.
        if succeeded:
            shutil.rmtree(home, ignore_errors=True)
        else:
            output.line(f"the throw-away cluster's logs: {home / 'logs'}", stderr=True)


def _placed(answer: dict[str, Any]) -> str:
    """Where a submitted task went: 'to worker local-1', or '(not placed: <why it waits>)'."""
    if answer.get("worker_id"):
        return f"to worker {answer['worker_id']}"
    return f"(not placed: {answer.get('pending_reason') or 'waiting for a worker'})"


def _no_worker_here(exc: waiting.Unschedulable, file: Path) -> NoReturn:
    """`mloc run`'s task that none of its workers can run. Unlike `mloc submit --wait`, nothing stays
    queued to cancel: the throw-away cluster stops with the command. So say what to change."""
    why = exc.reason.removeprefix("no registered worker can run this task: ")
    output.die(
        f"no worker of the throw-away cluster can run task {exc.task_id}: {why}. Ask for resources this machine "
        f"has (spec.resources in {file}), or submit it to a cluster that has such a worker: "
        f"MLOC_API_URL=http://HOST:8000 mloc submit {file}",
        code=1,
    )
