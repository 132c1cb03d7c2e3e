"""A TCP relay in front of a real Redis that can lose one answer: Redis applies the request, then
the client's connection closes before the reply reaches it, as when Redis is killed between writing
a command to its append-only file and answering it. It can also be cut: nothing passes and nothing
closes, as when a network link is down."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

APPLY_SEC = 0.3  # far longer than Redis takes to apply one request here


class LossyLink:
    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self.lost = threading.Event()  # set once an answer was lost
        # While set, nothing passes either way and no connection closes: a pulled cable, not a dead server.
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_answer_to(self, marker: bytes) -> None:
        """Lose the answer to the next request whose bytes contain ``marker`` (once)."""
        with self._lock:
            self._marker = marker
            self.lost.clear()

    def _take_marker(self, chunk: bytes) -> bool:
        with self._lock:
            if self._marker is not None and self._marker in chunk:
                self._marker = None
                return True
            return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            self._sockets += [client, server]
            swallow = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, swallow), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, swallow), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if self.cut.is_set():
                    continue
                if not self._take_marker(chunk):
                    server.sendall(chunk)
                    continue
                swallow.set()  # before Redis can answer
                server.sendall(chunk)
                # Redis reads and applies it; only then is the link cut, so it is not cut short.
                time.sleep(APPLY_SEC)
                _close(client, server)
                self.lost.set()
                return
        _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, swallow: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if not swallow.is_set() and not self.cut.is_set():
                    client.sendall(chunk)
        _close(client, server)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> LossyLink:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
