"""The `mloc` command line."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mloc.errors import ConfigError, MlocError
from mloc.orchestrator.usage import Grouping
from mloc.settings import NodeType, Settings, get_settings

app = typer.Typer(
    help="MLOC: run LLM inference, fine-tuning, RLHF, RAG and agent tasks on a worker fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage API users (admin).", no_args_is_help=True)
app.add_typer(users_app, name="users")
console = Console()
err = Console(stderr=True)


def _client() -> Any:
    from mloc.client import Client

    settings = get_settings()
    return Client(settings.resolved_api_url, settings.client_token)


def _fail(exc: MlocError) -> None:
    err.print(f"[red]error:[/red] {exc.message}")
    for detail in exc.details[:20]:
        err.print(f"  - {detail}")
    raise typer.Exit(2)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _error_line(message: str) -> None:
    """One plain line on stderr: no markup, emoji codes or wrapping that would change the text."""
    print(f"error: {message}", file=sys.stderr)


def _settings() -> Settings:
    """The settings, or one line per bad variable with the fix."""
    try:
        return get_settings()
    except ConfigError as exc:
        _error_line(exc.message)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------ servers
@app.command()
def start(
    node_type: Annotated[
        str | None, typer.Option("--node-type", help="orchestrator or worker (default: MLOC_NODE_TYPE).")
    ] = None,
) -> None:
    """Run an orchestrator or a worker in the foreground (Ctrl-C stops it).

    With no REDIS_URL / MLOC_REDIS_URL it uses a Redis answering at redis://localhost:6379, else the
    embedded one (started here when none runs yet), and logs which."""
    settings = _settings()
    try:
        chosen = NodeType((node_type or settings.node_type).upper())
    except ValueError:
        _error_line(f"--node-type must be orchestrator or worker, not {node_type!r}")
        raise typer.Exit(2) from None
    if chosen == NodeType.WORKER:
        from mloc.worker.listener import main as worker_main

        worker_main()
        return
    from mloc.orchestrator.server import main as orchestrator_main

    orchestrator_main()


# Settings that say where the local cluster runs; LocalCluster sets these itself for each process.
_CLUSTER_OWNED = ("MLOC_NODE_TYPE", "MLOC_PORT", "MLOC_HOST", "MLOC_HOME", "MLOC_LOG_FILE")


def _passed_settings() -> dict[str, str]:
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
        env=_passed_settings(),
    )
    try:
        cluster.start(timeout=120)
        console.print(
            f"[green]MLOC is up[/green]: API {cluster.api_url} (docs at /docs), Redis {cluster.redis_url}, "
            f"{workers} worker(s). Ctrl-C stops everything."
        )
        while all(p.poll() is None for p in [cluster.orchestrator, *cluster.worker_procs.values()] if p):
            time.sleep(0.5)
    except MlocError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@app.command()
def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A mloc/v1 task file.")],
    workers: Annotated[int, typer.Option(help="Local workers to start.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the task.")] = 3600,
) -> None:
    """Run one task end to end on a throw-away local cluster (embedded Redis, orchestrator, worker)
    and print its result."""
    from mloc.client import Client
    from mloc.localcluster import LocalCluster
    from mloc.spec import load

    try:
        load(file.read_bytes())
    except MlocError as exc:
        _fail(exc)
    settings = get_settings()
    home = Path(tempfile.mkdtemp(prefix="mloc-run-"))
    results = settings.results_dir.resolve()
    env = _passed_settings() | {"MLOC_MODELS_DIR": str(settings.resolved_models_dir)}
    with console.status("starting Redis, the orchestrator and a worker..."):
        cluster = LocalCluster(home=home, workers=workers, results_dir=results, env=env, log_dir=home / "logs")
        try:
            cluster.start(timeout=120)
        except MlocError as exc:
            cluster.stop()
            _fail(exc)
    client = Client(cluster.api_url)
    try:
        answer = client.submit(file)
        console.print(
            f"submitted task [bold]{answer['task_id']}[/bold] to worker {answer['worker_id']} (topic {answer['topic']})"
        )
        record = _wait_with_progress(client, answer["task_id"], timeout)
        _report(client, record, results)
        if record["state"] != "succeeded":
            raise typer.Exit(1)
    except MlocError as exc:
        _fail(exc)
    finally:
        client.close()
        cluster.stop()


def _wait_with_progress(client: Any, task_id: str, timeout: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        handle = bar.add_task("pending", total=None)

        def update(record: dict[str, Any]) -> None:
            progress = record.get("progress") or {}
            total = progress.get("total")
            text = record["state"]
            if progress.get("message"):
                text += f": {progress['message']}"
            bar.update(handle, description=text, total=total, completed=progress.get("step") or 0)

        return client.wait(task_id, timeout=timeout, on_update=update)


def _report(client: Any, record: dict[str, Any], results: Path | None = None) -> None:
    state = record["state"]
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state, "white")
    console.print(
        f"task {record['task_id']} [{color}]{state}[/{color}]"
        + (f": {record['reason']}" if record.get("reason") else "")
    )
    if state != "succeeded":
        return
    result = client.result(record["task_id"])
    items = result.get("items") if isinstance(result, dict) else None
    if items:
        spec = (record.get("spec") or {}).get("spec", {})
        prompts = (spec.get("inference") or {}).get("prompts") or []
        for item in items:
            index = item.get("index", 0)
            prompt = prompts[index] if index < len(prompts) else ""
            console.rule(f"[bold]#{index}[/bold] ({item.get('finish_reason', '')})")
            if prompt:
                console.print(f"[dim]{prompt}[/dim]", highlight=False)
            console.print(item.get("output", ""), highlight=False)
        console.rule()
    else:
        _print_json(result)
    usage = result.get("usage") if isinstance(result, dict) else None
    if usage:
        console.print("usage: " + ", ".join(f"{k}={v}" for k, v in usage.items()))
    if results is not None:
        console.print(f"result file: {results / record['task_id'] / 'responses.json'}")


# ---------------------------------------------------------------- client
@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the task to end and print its result.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show placement only.")] = False,
    timeout: Annotated[float, typer.Option()] = 3600,
) -> None:
    """Submit a task file to the orchestrator (MLOC_API_URL)."""
    client = _client()
    try:
        answer = client.submit(file, dry_run=dry_run)
        _print_json(answer)
        if wait and not dry_run:
            record = _wait_with_progress(client, answer["task_id"], timeout)
            _report(client, record)
            if record["state"] != "succeeded":
                raise typer.Exit(1)
    except MlocError as exc:
        _fail(exc)


@app.command("tasks")
def list_tasks(
    state: Annotated[str | None, typer.Option()] = None,
    owner: Annotated[str | None, typer.Option()] = None,
    page: Annotated[int, typer.Option()] = 1,
    page_size: Annotated[int, typer.Option()] = 20,
) -> None:
    """List tasks, newest first."""
    try:
        body = _client().tasks(state=state, owner=owner, page=page, page_size=page_size)
    except MlocError as exc:
        _fail(exc)
    table = Table(title=f"tasks (page {body['page']}, {body['total']} in all)")
    for column in ("id", "name", "type", "owner", "state", "worker", "created", "reason"):
        table.add_column(column)
    for t in body["items"]:
        table.add_row(
            t["task_id"],
            t["name"],
            t["task_type"],
            t["owner"],
            t["state"],
            t.get("worker_id") or "-",
            _when(t["created_at"]),
            (t.get("reason") or t.get("pending_reason") or "")[:60],
        )
    console.print(table)


@app.command()
def show(task_id: str) -> None:
    """Show one task."""
    try:
        _print_json(_client().task(task_id))
    except MlocError as exc:
        _fail(exc)


@app.command()
def result(task_id: str) -> None:
    """Print a task's result (responses.json)."""
    try:
        _print_json(_client().result(task_id))
    except MlocError as exc:
        _fail(exc)


@app.command()
def artifacts(
    task_id: str,
    get: Annotated[str | None, typer.Option("--get", help="Download this file (a path the list shows).")] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write it (default: its name, here; '-' = stdout).")
    ] = None,
) -> None:
    """List a task's result files, or download one with --get PATH [-o FILE]."""
    import httpx

    client = _client()
    try:
        if get is None:
            table = Table("path", "size (bytes)")
            for item in client.artifacts(task_id):
                table.add_row(item["path"], str(item["size"]))
            console.print(table)
            return
        target = output or Path(Path(get).name)
        blocks = client.artifact(task_id, get)
        if str(target) == "-":
            for block in blocks:
                sys.stdout.buffer.write(block)
            sys.stdout.buffer.flush()
            return
        partial = target.with_name(f".{target.name}.part")
        try:
            with open(partial, "wb") as handle:
                for block in blocks:
                    handle.write(block)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        err.print(f"wrote {target}")
    except MlocError as exc:
        _fail(exc)
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach the orchestrator at {client.http.base_url}: {exc} (MLOC_API_URL)")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write {exc.filename or output}: {exc.strerror or exc}")
        raise typer.Exit(2) from None


@app.command()
def cancel(task_id: str) -> None:
    """Cancel a task in any state before it ends."""
    try:
        _print_json(_client().cancel(task_id))
    except MlocError as exc:
        _fail(exc)


@app.command()
def logs(task_id: str, follow: Annotated[bool, typer.Option("-f", "--follow")] = False) -> None:
    """Print a task's logs; -f follows them until it ends."""
    client = _client()
    try:
        if follow:
            for line in client.follow_logs(task_id):
                entry = json.loads(line)
                if "message" in entry:
                    console.print(entry["message"], highlight=False)
        else:
            for entry in client.logs(task_id)["lines"]:
                console.print(entry.get("message", ""), highlight=False)
    except MlocError as exc:
        _fail(exc)


@app.command()
def workers() -> None:
    """List workers with their hardware and load."""
    try:
        body = _client().workers()
    except MlocError as exc:
        _fail(exc)
    table = Table(title=f"workers ({body['total']})")
    for column in (
        "id",
        "status",
        "topics",
        "GPUs",
        "CPU free/all",
        "slots free/all",
        "running",
        "heartbeat age",
    ):
        table.add_column(column)
    for w in body["items"]:
        gpus = w["hardware"].get("gpus", [])
        gpu_text = f"{len(w['free']['gpus'])}/{len(gpus)} {gpus[0]['name']}" if gpus else "-"
        table.add_row(
            w["worker_id"],
            w["status"],
            ",".join(w["topics"]),
            gpu_text,
            f"{w['free']['cpu_milli'] / 1000:g}/{w['capacity']['cpu_milli'] / 1000:g}",
            f"{w['free']['slots']}/{w['capacity']['slots']}",
            str(len(w["tasks"]) + w.get("hidden_tasks", 0)),  # a user is shown only their own tasks' ids
            f"{w['heartbeat_age_sec']}s",
        )
    console.print(table)


@app.command()
def cleanup() -> None:
    """Mark silent workers lost and requeue their tasks now (admin)."""
    try:
        _print_json(_client().cleanup())
    except MlocError as exc:
        _fail(exc)


# The counters `mloc stats` shows per period (all counters are in the totals table).
_PERIOD_COUNTERS = ("tasks", "wall_sec", "gpu_seconds", "prompt_tokens", "completion_tokens", "total_tokens")


@app.command()
def stats(
    user: Annotated[str | None, typer.Option(help="One user's usage; default: every user you may see.")] = None,
    start_date: Annotated[
        datetime | None,
        typer.Option(
            "--start-date", formats=["%Y-%m-%d"], help="First UTC day, YYYY-MM-DD (default: 29 days before the end)."
        ),
    ] = None,
    end_date: Annotated[
        datetime | None,
        typer.Option("--end-date", formats=["%Y-%m-%d"], help="Last UTC day, YYYY-MM-DD (default: today, UTC)."),
    ] = None,
    group_by: Annotated[
        Grouping,
        typer.Option("--group-by", help="A row per day, ISO week (2026-W48), month (2026-11), or none (total)."),
    ] = Grouping.DAY,
    after: Annotated[
        str | None, typer.Option(help="Every user, next page: start after this user (as the last page said).")
    ] = None,
) -> None:
    """Usage per user over any range of UTC days (YYYY-MM-DD): a row per period, then the totals."""
    try:
        body = _client().stats(
            user=user,
            start_date=start_date.date().isoformat() if start_date else None,
            end_date=end_date.date().isoformat() if end_date else None,
            group_by=group_by.value,
            after=after,
        )
    except MlocError as exc:
        _fail(exc)
    span = f"{body['start_date']} .. {body['end_date']}"
    for entry in body["users"]:
        name = escape(entry["user"])
        rows = entry.get("days") or entry.get("periods") or []
        if rows:
            shown = [c for c in _PERIOD_COUNTERS if c in entry["totals"]]
            table = Table(title=f"{name}: {span}, per {group_by.value}")
            table.add_column("date" if group_by is Grouping.DAY else group_by.value)
            for counter in shown:
                table.add_column(counter, justify="right")
            for row in rows:
                label = row.get("date") or row.get("period") or ""
                table.add_row(escape(label), *(f"{row.get(c, 0):g}" for c in shown))
            console.print(table)
        table = Table(title=f"{name}: {span}, totals")
        table.add_column("counter")
        table.add_column("total", justify="right")
        for counter, value in sorted(entry["totals"].items()):
            table.add_row(escape(counter), f"{value:g}")
        console.print(table)
    if not body["users"]:
        console.print(f"no usage recorded in {span}", markup=False, highlight=False)
    if body.get("next_after"):
        err.print(f"more users: run again with --after {body['next_after']}", markup=False, highlight=False)


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Check task files without submitting them."""
    from mloc.spec import load

    bad = 0
    for file in files:
        try:
            document = load(file.read_bytes())
            console.print(f"[green]ok[/green] {file}: {document.kind} ({document.spec.task_type})")
        except MlocError as exc:
            bad += 1
            err.print(f"[red]invalid[/red] {file}: {exc.message}")
            for detail in exc.details:
                err.print(
                    f"  {detail.get('path')}: {detail.get('message')}"
                    + (f" -> {detail['fix']}" if detail.get("fix") else "")
                )
    if bad:
        raise typer.Exit(1)


@app.command()
def schema(output: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
    """Print (or write) the JSON Schema of mloc/v1 tasks, for editors."""
    from mloc.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text + "\n")


MaxTasks = Annotated[
    int | None, typer.Option("--max-tasks", min=0, help="Tasks assigned or running at once (0 = unlimited).")
]
MaxGpus = Annotated[int | None, typer.Option("--max-gpus", min=0, help="GPUs held at once (0 = unlimited).")]


def _limit(value: int, is_default: bool) -> str:
    text = "unlimited" if value == 0 else str(value)
    return f"{text} (default)" if is_default else text


@users_app.command("add")
def users_add(name: str, max_tasks: MaxTasks = None, max_gpus: MaxGpus = None) -> None:
    """Create a user and print its token (shown once); optionally with its own quota."""
    body: dict[str, Any] = {"name": name}
    if max_tasks is not None:
        body["max_tasks"] = max_tasks
    if max_gpus is not None:
        body["max_gpus"] = max_gpus
    try:
        answer = _client()._call("POST", "/admin/users", json=body)
    except MlocError as exc:
        _fail(exc)
    quota = answer["quota"]
    tasks = _limit(quota["max_tasks"], quota["max_tasks_is_default"])
    gpus = _limit(quota["max_gpus"], quota["max_gpus_is_default"])
    console.print(f"user [bold]{answer['name']}[/bold] created (max tasks {tasks}, max GPUs {gpus})")
    console.print("token (shown once):")
    sys.stdout.write(answer["token"] + "\n")


@users_app.command("set-quota")
def users_set_quota(
    name: str,
    max_tasks: MaxTasks = None,
    max_gpus: MaxGpus = None,
    reset: Annotated[bool, typer.Option("--reset", help="Return both limits to the defaults first.")] = False,
) -> None:
    """Set a user's limits; the next task placed obeys them (running tasks are not stopped)."""
    if max_tasks is None and max_gpus is None and not reset:
        err.print("[red]error:[/red] give --max-tasks N and/or --max-gpus N (0 = unlimited), or --reset")
        raise typer.Exit(2)
    body: dict[str, Any] = {"reset": reset}
    if max_tasks is not None:
        body["max_tasks"] = max_tasks
    if max_gpus is not None:
        body["max_gpus"] = max_gpus
    try:
        answer = _client()._call("PUT", f"/admin/users/{name}/quota", json=body)
    except MlocError as exc:
        _fail(exc)
    quota, usage = answer["quota"], answer["usage"]
    console.print(
        f"{answer['name']}: max tasks {_limit(quota['max_tasks'], quota['max_tasks_is_default'])} "
        f"({usage['tasks']} in use), max GPUs {_limit(quota['max_gpus'], quota['max_gpus_is_default'])} "
        f"({usage['gpus']} in use)"
    )


@users_app.command("list")
def users_list() -> None:
    """Users with their quotas and what they hold now."""
    try:
        body = _client().users()
    except MlocError as exc:
        _fail(exc)
    table = Table("user", "created", "tasks (in use / max)", "GPUs (in use / max)")
    for item in body["items"]:
        quota, usage = item["quota"], item["usage"]
        table.add_row(
            item["name"],
            _when(item["created_at"]),
            f"{usage['tasks']} / {_limit(quota['max_tasks'], quota['max_tasks_is_default'])}",
            f"{usage['gpus']} / {_limit(quota['max_gpus'], quota['max_gpus_is_default'])}",
        )
    console.print(table)


@users_app.command("remove")
def users_remove(name: str) -> None:
    try:
        _print_json(_client().remove_user(name))
    except MlocError as exc:
        _fail(exc)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        _error_line(exc.message)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
