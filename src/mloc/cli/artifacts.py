"""`mloc artifacts`: list a task's result files, download one, or fetch a whole folder."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mloc.cli import output
from mloc.cli.output import JsonFlag
from mloc.cli.root import TaskIdArg, app, client, task_failed
from mloc.client import Client
from mloc.errors import MlocError


class _Blocks(io.RawIOBase):
    """A read-only file over an iterator of byte blocks, for tarfile's stream mode."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._blocks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


@app.command()
def artifacts(
    task_id: TaskIdArg,
    get: Annotated[
        str | None, typer.Option("--get", help="Download this file, or this whole folder, as the list shows it.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="With --get: where to write (default: its name, here; '-' = stdout, a tar stream for a "
            "folder). Without --get: json or table.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --get: replace a file or folder that is there already.")
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """List a task's result files, or download one file or a folder with --get PATH [-o TARGET].

    What is there already at TARGET is kept, and the command refused, unless --force."""
    api = client()
    try:
        full_id = api.resolve(task_id)
        if get is None:
            _list(api, full_id, json_out or target == "json", target)
            return
        path = get.strip("/")
        files = {item["path"] for item in api.artifacts(full_id)}
        if path in files:
            _file(api, full_id, path, target, force=force)
        else:
            _folder(api, full_id, path, target, force=force)
    except MlocError as exc:
        task_failed(api, task_id, exc)
    except OSError as exc:
        output.die(f"cannot write {exc.filename or target}: {exc.strerror or exc}")


def _list(api: Client, task_id: str, as_json: bool, target: str | None) -> None:
    if target not in (None, "json", "table"):
        output.die(f"-o {target!r} names the file to write with --get; without --get, -o takes json or table")
    items = api.artifacts(task_id)
    if as_json:
        output.print_json({"ok": True, "task_id": task_id, "items": items})
        return
    total = sum(int(item["size"]) for item in items)
    grid = output.table("PATH", "SIZE (BYTES)", caption=f"{len(items)} file(s), {output.size(total)}")
    for item in items:
        grid.add_row(output.cell(item["path"]), str(item["size"]))
    output.show(grid)


def _file(api: Client, task_id: str, path: str, target: str | None, *, force: bool) -> None:
    blocks = api.artifact(task_id, path)
    if target == "-":
        for block in blocks:
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        return
    where = Path(target) if target else Path(Path(path).name)
    if where.is_dir():
        where = where / Path(path).name  # as cp does: into the folder, under the file's own name
    if where.exists() and (where.is_dir() or not force):
        kind = "a folder" if where.is_dir() else "a file"
        fix = "" if where.is_dir() else ", or replace it with --force"
        output.die(f"{where} already exists ({kind}); choose a new name with -o{fix}")
    partial = where.with_name(f".{where.name}.part")
    try:
        with open(partial, "wb") as handle:
            for block in blocks:
                handle.write(block)
        partial.replace(where)
    finally:
        partial.unlink(missing_ok=True)
    output.line(f"wrote {output.visible(where, one_line=True)}", stderr=True)


def _folder(api: Client, task_id: str, path: str, target: str | None, *, force: bool) -> None:
    blocks = api.archive(task_id, path)
    if target == "-":
        for block in blocks:
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        return
    where = Path(target) if target else Path(Path(path).name or task_id)
    if not force and where.exists() and (not where.is_dir() or any(where.iterdir())):
        output.die(f"{where} already exists; choose a new folder with -o, or replace it with --force")
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{where.name}.part-", dir=where.parent))
    try:
        count = total = 0
        try:
            # Stream mode reads the archive once, as it arrives; the "data" filter refuses absolute
            # paths, '..', links out of the folder and device files, whatever the archive holds.
            with tarfile.open(fileobj=_Blocks(blocks), mode="r|") as archive:
                for member in archive:
                    archive.extract(member, staging, filter="data")
                    if member.isfile():
                        count += 1
                        total += member.size
        except tarfile.TarError as exc:
            output.die(f"the archive of {path or 'the task folder'} arrived broken ({exc}); fetch it again")
        # Only once the whole archive arrived: a broken download leaves what was there.
        if where.is_dir() and not where.is_symlink():
            shutil.rmtree(where)  # empty, as checked above, unless --force
        elif where.exists() or where.is_symlink():
            where.unlink()
        staging.replace(where)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shown = output.visible(where, one_line=True)
    output.line(
        f"wrote {count} file(s), {output.size(total)}, to {shown}{'' if shown.endswith('/') else '/'}", stderr=True
    )
