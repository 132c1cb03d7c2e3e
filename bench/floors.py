"""The floors under a task's path: what each layer it crosses costs alone, beside what MLOC spends there.

Run: python bench/floors.py [--requests 3000] [--json-out FILE]

bench/dispatch.py says how much CPU each process spends per task. This says how much of that the layers
under MLOC set on this machine, measured in one run, so the rest is known to be MLOC's own:

- A Redis round trip from Python. The floor: two processes passing one byte back and forth over TCP on
  loopback (each side's CPU per round trip). Then redis-py's asyncio client as MLOC makes it
  (``mloc.connection.connect``, uvloop): a PING, and an EVALSHA of a script that returns at once with
  seventy arguments, the size of a create-and-place or a start-and-end call. The client's CPU per call.
- An HTTP request. The floor: uvicorn with httptools and uvloop, as the orchestrator runs, serving a
  bare ASGI app that reads the body and answers a small JSON 201. Then MLOC's orchestrator answering a
  POST its submit lane refuses at once (a YAML error, 422: the app's middlewares and its error answer),
  and submits of the echo task placed on one of two workers of 64 slots (the orchestrator's CPU per
  request, and every process's, the task run to its end). The load generator is bench/dispatch.py's:
  eight keep-alive clients (bench.common.LeanHttp).

Each figure is the median of three rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
from uvicorn.loops.auto import auto_loop_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import LeanHttp, Server
from bench.dispatch import ECHO, echo_cluster, mloc_latency, mloc_throughput
from mloc.connection import connect
from mloc.settings import Settings

ROUNDS = 3
CLIENTS = 8
# A transition's call sends about seventy arguments (the task's fields, its keys, the move's part).
SCRIPT_ARGS = ["x" * 40] * 70
BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = b'{"task_id":"0123456789abcdef0123456789abcdef","state":"assigned","worker_id":"local-1"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""

# uvicorn on the socket it is handed, as the orchestrator runs it. Not `uvicorn --fd`: that takes any
# socket for a Unix one, so its connections would go without TCP_NODELAY.
SERVE_BARE_APP = (
    "import socket, sys, uvicorn; "
    "config = uvicorn.Config('bare_app:app', loop='uvloop', http='httptools', log_level='warning', access_log=False); "
    "uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[1]))])"
)


# ------------------------------------------------------------------ a round trip
def _answer_bytes(port: int, n: int, report: Connection) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.process_time()
        for _ in range(n):
            sock.recv(1)
            sock.sendall(b"x")
        report.send(time.process_time() - started)


def socket_round_trip(n: int) -> float:
    """Microseconds of CPU each side spends on one round trip of one byte between two processes."""
    context = mp.get_context("spawn")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours, theirs = context.Pipe()
        child = context.Process(target=_answer_bytes, args=(listener.getsockname()[1], n, theirs))
        child.start()
        sock, _ = listener.accept()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.process_time()
            for _ in range(n):
                sock.sendall(b"x")
                sock.recv(1)
            spent = time.process_time() - started
        spent += ours.recv()
        child.join()
    return spent / 2 / n * 1e6


async def _client_cpu(call: Callable[[], Awaitable[object]], n: int) -> float:
    for _ in range(min(200, n)):
        await call()
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) / n * 1e6


def _on_mlocs_loop(calls: Coroutine[object, object, dict[str, float]]) -> dict[str, float]:
    """Run ``calls`` on the event loop MLOC's processes run on (uvicorn's choice: uvloop where installed)."""
    with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
        return runner.run(calls)


async def redis_calls(url: str, n: int) -> dict[str, float]:
    """The client's microseconds of CPU per call through MLOC's redis-py client."""
    client = await connect(url, settings=Settings(redis_url=url))
    try:
        script = client.register_script("return 1")
        return {
            "ping": await _client_cpu(client.ping, n),
            "evalsha": await _client_cpu(lambda: script(keys=["k"], args=SCRIPT_ARGS), n),
        }
    finally:
        await client.aclose()


# ------------------------------------------------------------------ HTTP
async def _post(url: str, path: str, body: bytes, n: int, expect: int) -> None:
    remaining = iter(range(n))

    async def client() -> None:
        http = LeanHttp(url)
        for _ in remaining:
            status, answer = await http.post(path, body)
            if status != expect:
                raise SystemExit(f"POST {path} answered {status}, not {expect}: {answer[:300]!r}")
        await http.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


def _cpu(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(proc.cpu_times()[:2]) for name, proc in processes.items()}


def _per_request(processes: dict[str, psutil.Process], n: int, run: Callable[[], object]) -> dict[str, float]:
    """Microseconds of CPU each process spent per request while ``run`` sent ``n`` of them."""
    before = _cpu(processes)
    run()
    after = _cpu(processes)
    return {name: (after[name] - before[name]) / n * 1e6 for name in processes}


def bare_http(n: int) -> list[float]:
    """The bare server's microseconds of CPU per request, a round each."""
    folder = Path(tempfile.mkdtemp(prefix="mloc-floors-"))
    (folder / "bare_app.py").write_text(BARE_APP)
    # Bound here and handed over: the first requests wait in its backlog while the server starts.
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_BARE_APP, str(listener.fileno())],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        pass_fds=[listener.fileno()],
    )
    listener.close()
    try:
        processes = {"server": psutil.Process(server.pid)}
        try:
            asyncio.run(asyncio.wait_for(_post(url, "/", ECHO, min(500, n), 201), timeout=60))
        except TimeoutError:
            raise SystemExit("the bare uvicorn server did not answer within 60 s") from None
        return [
            _per_request(processes, n, lambda: asyncio.run(_post(url, "/", ECHO, n, 201)))["server"]
            for _ in range(ROUNDS)
        ]
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def mloc_http(server: Server, n: int) -> tuple[list[float], list[dict[str, float]]]:
    """The orchestrator's microseconds of CPU per refused POST, a round each; and every process's per
    submit, the task run to its end."""
    home = Path(tempfile.mkdtemp(prefix="mloc-floors-"))
    cluster = echo_cluster(server.url, home)
    try:
        cluster.start(timeout=180)
        mloc_latency(cluster.api_url, server.url, 30)
        assert cluster.orchestrator is not None  # started above
        processes = {"orchestrator": psutil.Process(cluster.orchestrator.pid)}
        processes |= {name: psutil.Process(proc.pid) for name, proc in cluster.worker_procs.items()}
        processes["redis"] = psutil.Process(server.proc.pid)

        def refuse() -> None:  # a YAML syntax error: refused once the body is parsed, nothing stored
            asyncio.run(_post(cluster.api_url, "/api/v1/tasks", b"taskType: [echo\n", n, 422))

        def submit() -> None:  # waits for every task to succeed: the workers' part is counted too
            mloc_throughput(cluster.api_url, server.url, n, bulk=False)

        refused = [_per_request(processes, n, refuse)["orchestrator"] for _ in range(ROUNDS)]
        return refused, [_per_request(processes, n, submit) for _ in range(ROUNDS)]
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="calls and requests per round")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args()
    n = args.requests

    print(f"a round trip: {n} calls a round, {ROUNDS} rounds...")
    socket_us = statistics.median([socket_round_trip(n) for _ in range(ROUNDS)])
    server = Server()
    try:
        calls = [_on_mlocs_loop(redis_calls(server.url, n)) for _ in range(ROUNDS)]
        print(f"HTTP: {n} requests a round from {CLIENTS} clients, {ROUNDS} rounds...")
        bare = statistics.median(bare_http(n))
        refused, submits = mloc_http(server, n)
    finally:
        server.stop()
    submit = {name: statistics.median([row[name] for row in submits]) for name in submits[0]}
    ping, evalsha = statistics.median([c["ping"] for c in calls]), statistics.median([c["evalsha"] for c in calls])
    refusal = statistics.median(refused)
    figures = {
        "socket_round_trip_us": socket_us,
        "redis_ping_us": ping,
        "redis_evalsha_us": evalsha,
        "http_bare_us": bare,
        "mloc_refused_us": refusal,
        "mloc_submit_us": submit,
    }
    rows = [
        ("a round trip: one byte over TCP, each side (floor)", socket_us, socket_us),
        ("redis-py, PING: the client", ping, socket_us),
        (f"redis-py, EVALSHA of {len(SCRIPT_ARGS)} arguments: the client", evalsha, socket_us),
        ("HTTP: bare uvicorn, POST -> 201: the server (floor)", bare, bare),
        ("MLOC, POST refused at once (422): the orchestrator", refusal, bare),
        ("MLOC, echo submit: the orchestrator", submit["orchestrator"], bare),
        ("MLOC, echo submit run to its end: every process", sum(submit.values()), bare),
    ]
    print(f"\n{'CPU per call or request (median of rounds)':62} {'us':>9} {'x its floor':>12}")
    for name, us, floor in rows:
        print(f"{name:62} {us:9.1f} {us / floor:12.1f}")
    print("the echo submit, by process (us): " + ", ".join(f"{name} {us:.0f}" for name, us in submit.items()))
    line = json.dumps({"floors": figures, "requests": n, "rounds": ROUNDS})
    if args.json_out:
        args.json_out.write_text(line)
    print(line)


if __name__ == "__main__":
    main()
