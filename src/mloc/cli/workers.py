"""Worker commands: `mloc workers` (list), `mloc workers cordon|uncordon|remove ID`, `mloc cleanup`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mloc.cli import output
from mloc.cli.output import JsonFlag, OutputFormat, Quiet, wants_json
from mloc.cli.root import app, client, workers_app
from mloc.errors import MlocError

STOPPED = ("offline", "lost")
# A stopped worker stays in the default listing this long, so a fresh loss is seen; --all shows the rest.
AGE_OUT_SEC = 600.0
STATUS_STYLE = {"active": "green", "draining": "yellow", "restarting": "yellow", "lost": "red", "offline": "dim"}


def aged_out(worker: dict[str, Any]) -> bool:
    age = worker.get("heartbeat_age_sec")
    return worker.get("status") in STOPPED and (age is None or age > AGE_OUT_SEC)


def _gpus(worker: dict[str, Any]) -> str:
    gpus = worker.get("hardware", {}).get("gpus") or []
    if not gpus:
        return "-"
    names = sorted({str(g.get("name", "?")) for g in gpus})
    free = len(worker.get("free", {}).get("gpus") or [])
    return f"{free}/{len(gpus)} {', '.join(names)}"


def _memory(worker: dict[str, Any]) -> str:
    free = int(worker.get("free", {}).get("memory_bytes") or 0)
    total = int(worker.get("capacity", {}).get("memory_bytes") or 0)
    if not total:
        return "-"
    free_text, total_text = output.size(free), output.size(total)
    if free_text.split()[-1] == total_text.split()[-1]:  # one unit for both: "3.5/16.0 GiB"
        return f"{free_text.split()[0]}/{total_text}"
    return f"{free_text}/{total_text}"


def _heartbeat(worker: dict[str, Any]) -> str:
    age = worker.get("heartbeat_age_sec")
    return "-" if age is None else ("just now" if age < 2 else f"{output.duration(age)} ago")


@workers_app.callback()
def workers(
    ctx: typer.Context,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Also workers offline or lost for a while.")] = False,
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
    quiet: Quiet = False,
) -> None:
    """Workers: status, free/total CPU, memory, GPUs and slots, warm models, last heartbeat.

    Workers offline or lost for over 10 minutes are left out unless --all; `mloc workers remove ID`
    forgets one."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        api = client()
        body = api.workers(page_size=1000)
        while len(body["items"]) < body["total"]:
            more = api.workers(page=body["page"] + 1, page_size=1000)
            if not more["items"]:
                break
            body = {**body, "page": more["page"], "items": body["items"] + more["items"]}
    except MlocError as exc:
        output.fail(exc)
    items = body["items"] if show_all else [w for w in body["items"] if not aged_out(w)]
    hidden = len(body["items"]) - len(items)
    if wants_json(json_out, fmt):
        output.print_json({**body, "items": items, "hidden": hidden})
        return
    if quiet:
        for worker in items:
            output.line(worker["worker_id"])
        return
    caption = f"{hidden} offline or lost worker(s) not shown: --all shows them" if hidden else None
    grid = output.table(
        "ID",
        "STATUS",
        "TOPICS",
        "TAGS",
        "CPU",
        "MEMORY",
        "GPUS",
        "SLOTS",
        "RUNNING",
        "WARM MODELS",
        "HEARTBEAT",
        title=f"workers ({len(items)}; CPU, memory, GPUs and slots free/total)",
        caption=caption,
    )
    for index in (1, 4, 7, 8):  # states and counts stay whole; names and lists may wrap
        grid.columns[index].no_wrap = True
    output.keep_whole(grid, 0, (output.visible(w["worker_id"], one_line=True) for w in items))
    for w in items:
        capacity, free = w.get("capacity", {}), w.get("free", {})
        running = len(w.get("tasks") or []) + int(w.get("hidden_tasks") or 0)  # a user sees only their own ids
        grid.add_row(
            output.cell(w["worker_id"]),
            output.styled(
                output.visible(w["status"] + (" (cordoned)" if w.get("cordoned") else ""), one_line=True),
                STATUS_STYLE.get(w["status"], ""),
            ),
            output.cell(",".join(w.get("topics") or [])),
            output.cell(",".join(w.get("tags") or []) or "-"),
            f"{free.get('cpu_milli', 0) / 1000:g}/{capacity.get('cpu_milli', 0) / 1000:g}",
            _memory(w),
            output.cell(_gpus(w)),
            f"{free.get('slots', 0)}/{capacity.get('slots', 0)}",
            str(running),
            output.cell(", ".join(w.get("warm_models") or []) or "-"),
            _heartbeat(w),
        )
    output.show(grid)
    for w in items:
        if w.get("warning"):
            output.line(output.visible(f"warning: worker {w['worker_id']}: {w['warning']}"), stderr=True)


@workers_app.command("cordon")
def cordon(worker_id: Annotated[str, typer.Argument(help="A worker id, as `mloc workers` lists it.")]) -> None:
    """Place no new task on a live worker (admin); what it runs finishes there. `uncordon` undoes it."""
    _cordon(worker_id, on=True)


@workers_app.command("uncordon")
def uncordon(worker_id: Annotated[str, typer.Argument(help="A cordoned worker's id.")]) -> None:
    """Place tasks on a cordoned worker again (admin)."""
    _cordon(worker_id, on=False)


def _cordon(worker_id: str, *, on: bool) -> None:
    try:
        answer = client().cordon_worker(worker_id, on=on)
    except MlocError as exc:
        output.fail(exc)
    done = "cordoned: no new task is placed on it" if on else "uncordoned: tasks are placed on it again"
    if answer["was"] == answer["status"]:
        done = "already " + done
    output.line(output.visible(f"worker {answer['worker_id']} {done}", one_line=True))


@workers_app.command("remove")
def remove(worker_id: Annotated[str, typer.Argument(help="A worker id, as `mloc workers --all` lists it.")]) -> None:
    """Forget a worker that is offline or lost (admin); a live one is refused."""
    try:
        answer = client().remove_worker(worker_id)
    except MlocError as exc:
        output.fail(exc)
    output.line(output.visible(f"removed worker {answer['worker_id']} (it was {answer['status']})", one_line=True))


@app.command()
def cleanup(json_out: JsonFlag = False) -> None:
    """Mark silent workers lost and requeue their tasks now (admin)."""
    try:
        report = client().cleanup()
    except MlocError as exc:
        output.fail(exc)
    if json_out:
        output.print_json(report)
        return
    output.line(output.visible(cleanup_text(report), one_line=True))


def cleanup_text(report: dict[str, Any]) -> str:
    """'2 worker(s) marked lost (w1, w2): 3 task(s) requeued, 1 failed' or 'no silent worker found'."""
    lost = report.get("lost_workers") or []
    parts = [
        f"{len(report.get(key) or [])} task(s) {word}"
        for key, word in (("requeued", "requeued"), ("failed", "failed"), ("cancelled", "cancelled"))
        if report.get(key)
    ]
    text = f"{len(lost)} worker(s) marked lost ({', '.join(lost)})" if lost else "no silent worker found"
    if parts:
        text += ": " + ", ".join(parts)
    forgotten = report.get("forgotten_tasks")
    if forgotten:
        count = len(forgotten) if isinstance(forgotten, list) else int(forgotten)
        text += f"; {count} finished task(s) past their retention removed"
    return text
