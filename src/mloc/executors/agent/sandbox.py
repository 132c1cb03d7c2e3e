"""Run untrusted Python (an agent's ``python_repl`` tool) in a confined subprocess.

The child confines itself before it runs any of the code, in this order:

1. new mount and network namespaces: the network namespace has only a loopback interface that is
   down, so every connection fails (also to services on the worker's own loopback);
2. fresh read-only tmpfs mounts over the world-writable folders (``/tmp``, ``/var/tmp``,
   ``/dev/shm``, ``/run/lock``), with only its private working folder bound back in;
3. as root: all groups dropped and a throwaway unprivileged uid/gid taken, so file permissions deny
   writes everywhere but the working folder, and ``RLIMIT_NPROC`` (which root ignores) caps forks;
4. resource limits: address space, CPU seconds, processes, file size, open files, no core dumps.

The parent enforces a wall-clock timeout, kills the process group and every process left with the
throwaway uid, and returns at most ``max_output_bytes`` of output.

Without root the child uses an unprivileged user namespace instead of a uid change: the network and
``/tmp`` are still cut off, but files the worker's own user may write stay writable and the process
limit counts that user's processes. Where neither root nor user namespaces are available the sandbox
refuses to run (:class:`SandboxUnavailable`) rather than run code unconfined.

This file is also the child's entry point (``python -I sandbox.py``), so its top level imports only
the standard library.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import json
import linecache
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# World-writable places a process could otherwise leave files in or talk through.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Throwaway uids are drawn from a range no distribution hands out to accounts.
UID_RANGE = (1_500_000, 1_900_000)
SNIPPET = "<python_repl>"
CHILD_FAILED = 121  # exit status of a child that could not confine itself; it never ran the code


class SandboxUnavailable(RuntimeError):
    """This machine cannot confine a child process (no root and no user namespaces)."""


@dataclass(frozen=True)
class Limits:
    timeout_sec: float = 10.0
    memory_bytes: int = 512 * 1024 * 1024
    max_processes: int = 16
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 128
    max_output_bytes: int = 32 * 1024
    tmpfs_bytes: int = 1024 * 1024


@dataclass
class SandboxResult:
    """What the code printed, how it ended, and how it was confined."""

    output: str
    exit_code: int | None
    timed_out: bool
    duration_sec: float
    isolation: str
    truncated: bool = False
    killed_by: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def isolation_mode() -> str:
    """``root`` (namespaces and a throwaway uid) or ``userns`` (unprivileged user namespace)."""
    if os.geteuid() == 0:
        return "root"
    if _userns_works():
        return "userns"
    raise SandboxUnavailable(
        "cannot sandbox Python here: the worker is not root and unprivileged user namespaces are "
        "disabled (sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces); run the worker "
        "as root in its container or enable user namespaces"
    )


def _userns_works() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        done = subprocess.run(
            [unshare, "--user", "--map-root-user", "--net", "--mount", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class PythonSandbox:
    """Runs snippets of Python, each in a fresh confined process sharing one private folder."""

    def __init__(self, limits: Limits | None = None, *, base_dir: Path | None = None) -> None:
        self.limits = limits or Limits()
        self.mode = isolation_mode()
        self.uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
        self.workdir = Path(tempfile.mkdtemp(prefix="mloc-sandbox-", dir=base_dir))
        if self.mode == "root":
            os.chown(self.workdir, self.uid, self.uid)
        self.workdir.chmod(0o700)

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._kill_leftovers()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self, code: str) -> SandboxResult:
        limits = self.limits
        config = {
            "mode": self.mode,
            "uid": self.uid,
            "workdir": str(self.workdir),
            "limits": asdict(limits),
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir),
            "TMPDIR": str(self.workdir),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONUNBUFFERED": "1",
        }
        started = time.monotonic()
        timed_out = False
        # Output goes to a file the parent owns, so RLIMIT_FSIZE bounds it and a print loop cannot
        # fill the worker's memory through a pipe.
        with tempfile.TemporaryFile() as sink:
            process = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
            assert process.stdin is not None
            try:
                process.stdin.write(code.encode("utf-8"))
                process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                exit_code: int | None = process.wait(timeout=limits.timeout_sec)
            except subprocess.TimeoutExpired:
                timed_out = True
                exit_code = None
            self._kill_group(process.pid)
            if timed_out:
                process.wait()
            self._kill_leftovers()
            duration = time.monotonic() - started
            sink.seek(0)
            raw = sink.read(limits.max_output_bytes + 1)
        truncated = len(raw) > limits.max_output_bytes
        output = raw[: limits.max_output_bytes].decode("utf-8", errors="replace")
        if exit_code == CHILD_FAILED and "mloc-sandbox:" in output:
            raise SandboxUnavailable(output.strip().splitlines()[-1])
        killed_by = None
        if exit_code is not None and exit_code < 0:
            killed_by = signal.Signals(-exit_code).name
        notes = []
        if timed_out:
            notes.append(f"killed after the {limits.timeout_sec:g} s time limit")
        elif killed_by == "SIGXCPU":
            notes.append(f"killed after {limits.timeout_sec:g} s of CPU time")
        elif killed_by == "SIGXFSZ":
            notes.append(f"killed for writing a file over {limits.max_file_bytes} bytes")
        elif killed_by:
            notes.append(f"killed by {killed_by}")
        if truncated:
            notes.append(f"output cut at {limits.max_output_bytes} bytes")
        return SandboxResult(
            output=output,
            exit_code=exit_code,
            timed_out=timed_out,
            duration_sec=round(duration, 3),
            isolation=self.mode,
            truncated=truncated,
            killed_by=killed_by,
            notes=notes,
        )

    @staticmethod
    def _kill_group(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _kill_leftovers(self) -> None:
        """Kill every process still running as the throwaway uid (children that left the group).

        A helper that takes the uid and calls kill(-1, SIGKILL) reaches all of them at once, so a
        fork bomb cannot outpace it; repeated until /proc shows none alive (zombies do not count).
        """
        if self.mode != "root":
            return
        deadline = time.monotonic() + 10
        while self._alive_as_uid() and time.monotonic() < deadline:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the forked helper
                try:
                    os.setgroups([])
                    os.setgid(self.uid)
                    os.setuid(self.uid)
                    for _ in range(3):
                        os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.01)

    def _alive_as_uid(self) -> bool:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text().splitlines()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            if int(fields.get("Uid", "-1 ").split()[0]) == self.uid and not fields.get("State", "").strip().startswith(
                "Z"
            ):
                return True
        return False


# ---- child side: runs in the sandboxed process, before and instead of the user's code ----


def _fail(message: str) -> None:
    sys.stdout.write(f"mloc-sandbox: {message}\n")
    sys.stdout.flush()
    os._exit(CHILD_FAILED)


def _libc_call(libc: ctypes.CDLL, name: str, *args: Any) -> None:
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        _fail(f"{name}{args!r} failed: {os.strerror(errno)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    encode = lambda value: None if value is None else value.encode()  # noqa: E731
    _libc_call(libc, "mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


def _interpreter_paths() -> set[str]:
    """Folders the sandboxed interpreter needs: its prefixes and every folder on sys.path."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, *(p for p in sys.path if p and os.path.isdir(p))}
    return {str(Path(p).resolve()) for p in paths}


def _outermost(paths: list[str]) -> list[str]:
    """The paths not inside another one of them."""
    ordered = sorted(set(paths))
    return [p for p in ordered if not any(q != p and os.path.commonpath([q, p]) == q for q in ordered)]


def _expose_interpreter(libc: ctypes.CDLL) -> None:
    """Make the interpreter and its libraries reachable for the throwaway uid.

    Python often lives under a folder only root may enter (``/root/.pyenv``). Such a folder is
    replaced, in this namespace only, by an empty one that others may traverse, with just the
    needed subfolder bound back in, which also hides the rest of it.
    """
    needed = _interpreter_paths()
    closed: dict[str, set[str]] = {}
    for path in sorted(needed):
        parts = Path(path).resolve().parts
        for depth in range(1, len(parts)):
            folder = os.path.join(*parts[:depth])
            if os.stat(folder).st_mode & 0o001 == 0:
                closed.setdefault(folder, set()).add(parts[depth])
                break
    for folder, children in closed.items():
        handles = {child: os.open(os.path.join(folder, child), os.O_PATH) for child in children}
        _mount(libc, "tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=711")
        for child, handle in handles.items():
            target = os.path.join(folder, child)
            if os.path.isdir(f"/proc/self/fd/{handle}"):
                os.mkdir(target)
            else:
                Path(target).touch()
            _mount(libc, f"/proc/self/fd/{handle}", target, None, MS_BIND | MS_REC, "")
            os.close(handle)
        _mount(libc, None, folder, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "")


def _confine(config: dict[str, Any]) -> None:
    mode = config["mode"]
    workdir = config["workdir"]
    limits = config["limits"]
    libc = ctypes.CDLL(None, use_errno=True)
    real_uid, real_gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | (CLONE_NEWUSER if mode == "userns" else 0)
    _libc_call(libc, "unshare", flags)
    if mode == "userns":
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {real_uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {real_gid} 1")
    # Mount changes must stay inside this namespace.
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, "")
    keep = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    mode_flags = MS_NOSUID | MS_NODEV
    interpreter = _interpreter_paths()
    for shared in SHARED_WRITABLE:
        if not os.path.isdir(shared) or os.path.islink(shared):
            continue
        # The interpreter itself may live under a masked folder (a virtualenv or checkout in /tmp):
        # hold on to those folders now and bind them back, read-only, over the fresh tmpfs.
        inner = _outermost([p for p in interpreter if os.path.commonpath([shared, p]) == shared and p != shared])
        held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in inner]
        _mount(libc, "tmpfs", shared, "tmpfs", mode_flags, f"size={limits['tmpfs_bytes']},mode=755")
        inside = os.path.commonpath([shared, workdir]) == shared
        if inside:
            os.makedirs(workdir, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{keep}", workdir, None, MS_BIND, "")
        for path, handle in held:
            os.makedirs(path, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC, "")
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | mode_flags, "")
            os.close(handle)
        _mount(libc, None, shared, None, MS_REMOUNT | MS_RDONLY | mode_flags, "")
    os.close(keep)
    if mode == "root":
        _expose_interpreter(libc)
        uid = int(config["uid"])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # The parent's wall-clock limit normally ends the run; CPU time is the backstop should the
    # parent die, with SIGXCPU first and SIGKILL a second later.
    cpu = max(1, int(limits["timeout_sec"] + 1.999))
    for which, soft, hard in (
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_NPROC, limits["max_processes"], limits["max_processes"]),
        (resource.RLIMIT_FSIZE, limits["max_file_bytes"], limits["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(which, (soft, hard))
    os.chdir(workdir)


def _run_user_code(code: str) -> None:
    """Run like a REPL cell: statements run, and a trailing expression's value is printed."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    linecache.cache[SNIPPET] = (len(code), None, code.splitlines(keepends=True), SNIPPET)
    tree = ast.parse(code, filename=SNIPPET, mode="exec")
    tail = None
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body.pop()
        tail = ast.Expression(body=last.value)
    exec(compile(tree, SNIPPET, "exec"), namespace)
    if tail is not None:
        value = eval(compile(tail, SNIPPET, "eval"), namespace)
        if value is not None:
            print(repr(value))


def _child_main() -> None:
    config = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    _confine(config)
    del sys.argv[1:]
    try:
        _run_user_code(code)
    except SystemExit:
        raise
    except BaseException as exc:
        # Show only the user's frames, not this bootstrap's.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != SNIPPET:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.exit(1)


if __name__ == "__main__":
    _child_main()
