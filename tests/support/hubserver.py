"""A small Hugging Face Hub on loopback, for download tests: the hub is out of reach in the test machines.

It speaks the endpoints ``huggingface_hub.snapshot_download`` (1.x) and MLOC's own fetcher call:

- ``GET /api/models/{repo}/revision/{rev}``: model info, with ``sha`` (the commit) and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}?recursive=true``: the files, sizes, and LFS SHA-256 for weights;
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (and ``X-Linked-Etag``
  and ``X-Linked-Size`` for LFS files), ``Content-Length``, and ``Range`` requests;
- ``HEAD`` and ``GET /files/{name}``: plain files, as any https server would serve a ``.gguf``, with a
  strong ETag and ``If-Range``.

Errors carry ``X-Error-Code`` as the hub's do. A test can require a bearer token, slow the bytes down,
cut the first transfer of a file half-way, and read every request the server saw.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Hub:
    """What the server serves and how; tests change the fields while it runs."""

    repos: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> ref -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    files: dict[str, bytes] = field(default_factory=dict)  # /files/{name}
    token: str | None = None
    # Bytes /resolve/ sends for a path instead of the listed ones, as a corrupt mirror would.
    corrupt: dict[str, bytes] = field(default_factory=dict)
    bytes_per_sec: float | None = None
    # Cut the transfer after this share of the body, for the next ``drops`` GETs of a file.
    drop_at: float = 0.5
    drops: int = 0
    drop_only: str = ""  # only files whose path holds this
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        """Publish ``files`` as a new commit of ``repo`` that ``ref`` points at; returns the commit."""
        listing = json.dumps({path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())})
        commit = hashlib.sha1(f"{repo}:{listing}".encode()).hexdigest()
        with self.lock:
            self.commits[commit] = dict(files)
            self.repos.setdefault(repo, {})[ref] = commit
        return commit

    def add_folder(self, repo: str, folder: Path, ref: str = "main") -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo, files, ref)

    def seen(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub  # set on the subclass each server makes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # --- answers -----------------------------------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, send_body: bool = True) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _json(self, value: Any) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(value).encode())

    def _error(self, status: int, code: str, message: str, send_body: bool = True) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                   body, send_body=send_body)  # fmt: skip

    def _serve(self, body: bool) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        if path.startswith("/files/"):
            with hub.lock:
                data = hub.files.get(path.removeprefix("/files/"))
            if data is None:
                return self._error(404, "EntryNotFound", "no such file", body)
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._bytes(data, {"ETag": etag}, etag, body)
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header", body)
        if path.startswith("/api/models/"):
            return self._api(path.removeprefix("/api/models/"), parse_qs(url.query))
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, file = rest.partition("/")
            commit = self._commit(repo, revision, body)
            if commit is None:
                return None
            with hub.lock:
                data = hub.commits[commit].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} not in {repo}", body)
            etag = f'"{hashlib.sha256(data).hexdigest() if _is_lfs(file) else _oid(data)}"'
            headers = {"X-Repo-Commit": commit, "ETag": etag}
            if _is_lfs(file):
                headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
            with hub.lock:
                data = hub.corrupt.get(file, data)
            return self._bytes(data, headers, etag, body)
        return self._error(404, "NotFound", "unknown endpoint", body)

    def _commit(self, repo: str, revision: str, send_body: bool = True) -> str | None:
        with self.hub.lock:
            refs = self.hub.repos.get(repo)
            commit = (
                None if refs is None else refs.get(revision) or (revision if revision in self.hub.commits else None)
            )
        if refs is None:
            self._error(404, "RepoNotFound", f"Repository {repo} not found", send_body)
        elif commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
        return commit

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        for marker in ("/revision/", "/tree/"):
            if marker in rest:
                repo, _, tail = rest.partition(marker)
                revision = tail.split("/", 1)[0]
                commit = self._commit(repo, revision)
                if commit is None:
                    return
                with self.hub.lock:
                    files = self.hub.commits[commit]
                if marker == "/revision/":
                    siblings = [{"rfilename": name} for name in sorted(files)]
                    return self._json({"id": repo, "modelId": repo, "sha": commit, "private": False,
                                       "siblings": siblings})  # fmt: skip
                return self._json(_tree(files))
        self._error(404, "NotFound", "unknown api endpoint")

    def _bytes(self, data: bytes, headers: dict[str, str], etag: str, send_body: bool) -> None:
        start = 0
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        status = 200
        if wanted and wanted.startswith("bytes=") and (if_range is None or if_range == etag):
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, send_body=send_body)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            data = data[start:end]
        self.send_response(status)
        for name, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not send_body:
            return
        cut = None
        with self.hub.lock:
            if self.hub.drops > 0 and len(data) > 1 and self.hub.drop_only in self.path:
                self.hub.drops -= 1
                cut = int(len(data) * self.hub.drop_at)
        view = memoryview(data)[:cut] if cut is not None else memoryview(data)
        step = 64 * 1024
        for offset in range(0, len(view), step):
            self.wfile.write(view[offset : offset + step])
            if self.hub.bytes_per_sec:
                time.sleep(step / self.hub.bytes_per_sec)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early


def _tree(files: dict[str, bytes]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    folders = sorted({str(Path(name).parent) for name in files if "/" in name})
    for folder in folders:
        entries.append({"type": "directory", "oid": _oid(folder.encode()), "size": 0, "path": folder})
    for name, data in sorted(files.items()):
        entry: dict[str, Any] = {"type": "file", "oid": _oid(data), "size": len(data), "path": name}
        if _is_lfs(name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return entries


class HubServer:
    """The hub on a free loopback port, in a thread; ``url`` is what HF_ENDPOINT takes."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub or Hub()
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubserver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
