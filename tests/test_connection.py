"""Redis in production: passwords and ACL users, TLS, Sentinel, and the start-up errors a person can act on.

Every server here is a real redis-server (TLS with certificates made by openssl for the test, Sentinel with
`redis-server --sentinel`), and the full-run tests start a real orchestrator and worker through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from mloc.client import Client
from mloc.connection import connect, parse, redact, sync_client
from mloc.errors import ConfigError
from mloc.localcluster import LocalCluster
from mloc.settings import Settings
from tests.conftest import FAST_ENV, free_port

REDIS = shutil.which("redis-server") or "redis-server"


class Server:
    """A redis-server process (plain, TLS or Sentinel) that the test owns."""

    def __init__(self, workdir: Path, *args: str, conf: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [REDIS]
        if conf is not None:
            path = workdir / "redis.conf"
            path.write_text(conf)
            argv.append(str(path))
        argv += ["--dir", str(workdir), "--save", "", "--appendonly", "no", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self, client: redis.Redis, timeout: float = 10) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.AuthenticationError:
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def plain(servers: list[Server], workdir: Path, *args: str) -> int:
    port = free_port()
    server = Server(workdir, "--port", str(port), "--bind", "127.0.0.1", *args)
    servers.append(server.wait(redis.Redis(port=port)))
    return port


def settings_with(**env: str) -> Settings:
    """Settings as a process with these environment variables would read them."""
    return Settings.model_validate(env)


def try_connect(
    url: str, settings: Settings | None = None, attempts: int = 2, max_delay: float = 0.2
) -> tuple[str, float]:
    """Connect, PING, and return ("ok" or the error message, seconds it took)."""

    async def go() -> str:
        client = await connect(url, settings=settings or Settings(), attempts=attempts, max_delay=max_delay)
        try:
            assert await client.ping()
            await client.set("mloc:probe", "1")
            return "ok"
        finally:
            await client.aclose()

    started = time.monotonic()
    try:
        outcome = asyncio.run(go())
    except ConfigError as exc:
        outcome = exc.message
    return outcome, time.monotonic() - started


@contextlib.contextmanager
def mloc_on(tmp_path: Path, url: str, env: dict[str, str] | None = None) -> Iterator[Client]:
    """A real orchestrator and worker against ``url``, and an HTTP client for the orchestrator."""
    cluster = LocalCluster(
        home=tmp_path / "home",
        workers=1,
        redis_url=url,
        results_dir=tmp_path / "results",
        env={**FAST_ENV, **(env or {})},
        log_dir=tmp_path / "logs",
    )
    try:
        cluster.start(timeout=60)
        client = Client(cluster.api_url)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.stop()


def echo_succeeds(client: Client, payload: str = "redis") -> dict:
    """Submit one echo task over HTTP; it must succeed with its payload."""
    answer = client.submit(f"taskType: echo\npayload: {{hello: {payload}}}\n".encode())
    record = client.wait(answer["task_id"], timeout=30)
    assert record["state"] == "succeeded", record
    assert client.result(answer["task_id"])["payload"] == {"hello": payload}
    return record


def run_one_echo_task(tmp_path: Path, url: str, env: dict[str, str] | None = None) -> dict:
    with mloc_on(tmp_path, url, env) as client:
        return echo_succeeds(client)


# ---------------------------------------------------------------------------- URLs
def test_redis_urls_are_checked_and_bad_ones_name_the_fix() -> None:
    target = parse("redis+sentinel://mloc:pw@10.0.0.1:26379,s2,[::1]:26380/mymaster/2?sentinel_password=sp")
    assert target.sentinels == [("10.0.0.1", 26379), ("s2", 26379), ("::1", 26380)]
    assert (target.master, target.db, target.username, target.password) == ("mymaster", 2, "mloc", "pw")
    assert target.sentinel_password == "sp" and not target.tls
    assert "pw" not in repr(target) and "sp" not in repr(target)
    assert parse("rediss+sentinel://s1/m").tls and parse("rediss://h:6380/0").tls
    assert redact("redis+sentinel://u:pw@a:1,b:2/m/0?sentinel_password=sp") == (
        "redis+sentinel://u:***@a:1,b:2/m/0?sentinel_password=***"
    )
    assert redact("rediss://:secret@h:6380/0") == "rediss://:***@h:6380/0"
    for url, words in [
        ("http://redis:6379", "is not a Redis URL; use redis://"),
        ("localhost:6379", "is not a Redis URL"),
        ("redis+sentinel://s1:26379,s2:26379", "must name the master after the Sentinels"),
        ("redis+sentinel://s1:26379/m/zero", "database 'zero' must be a number"),
        ("redis+sentinel://s1:99999/m", "out of range"),
        ("redis://host:port/0", "bad port"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse(url)


def test_tls_files_with_a_plain_url_or_missing_files_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used")
    message, _ = try_connect("redis://127.0.0.1:1/0", settings_with(MLOC_REDIS_TLS_CA_FILE=str(ca)))
    assert "MLOC_REDIS_TLS_CA_FILE set, but REDIS_URL redis://127.0.0.1:1/0 is not a TLS URL; use rediss://" in message
    message, _ = try_connect("rediss://127.0.0.1:1/0", settings_with(MLOC_REDIS_TLS_CA_FILE=str(tmp_path / "no.pem")))
    assert "MLOC_REDIS_TLS_CA_FILE is" in message and "not a readable file" in message
    message, _ = try_connect("rediss://127.0.0.1:1/0", settings_with(MLOC_REDIS_TLS_CERT_FILE=str(ca)))
    assert "needs both MLOC_REDIS_TLS_CERT_FILE and MLOC_REDIS_TLS_KEY_FILE" in message


# ----------------------------------------------------------------------- passwords
def test_password_and_acl_user_wrong_or_missing_credentials_fail_at_once(servers: list[Server], tmp_path: Path) -> None:
    port = plain(servers, tmp_path / "r", "--requirepass", "s3cret")
    admin = redis.Redis(port=port, password="s3cret")
    admin.acl_setuser(
        "mloc", enabled=True, passwords=["+mlocpw"], keys=["mloc:*"], channels=["mloc:*"], commands=["+@all", "-@admin"]
    )
    base = f"127.0.0.1:{port}/0"
    assert try_connect(f"redis://:s3cret@{base}")[0] == "ok"
    assert try_connect(f"redis://mloc:mlocpw@{base}")[0] == "ok"
    missing, took = try_connect(f"redis://{base}")
    assert "requires a password; put it in REDIS_URL: redis://:PASSWORD@host:6379/0" in missing and took < 2
    wrong, took = try_connect(f"redis://:nope@{base}")
    assert "refused the credentials" in wrong and "check the user name and password in REDIS_URL" in wrong
    assert "nope" not in wrong and took < 2
    wrong_user, _ = try_connect(f"redis://bob:s3cret@{base}")
    assert "refused the credentials" in wrong_user and "bob:***@" in wrong_user
    # The ACL user may touch only mloc:* keys: a PING works, a write elsewhere is refused by Redis itself.
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=port, username="mloc", password="mlocpw").set("other:key", "1")


def test_full_run_as_an_acl_user_confined_to_mloc_keys(servers: list[Server], tmp_path: Path) -> None:
    """The ACL that docs/deployment.md recommends is enough for the orchestrator and a worker."""
    port = plain(servers, tmp_path / "r", "--requirepass", "s3cret")
    redis.Redis(port=port, password="s3cret").acl_setuser(
        "mloc", enabled=True, passwords=["+mlocpw"], keys=["mloc:*"], channels=["mloc:*"], commands=["+@all", "-@admin"]
    )
    record = run_one_echo_task(tmp_path, f"redis://mloc:mlocpw@127.0.0.1:{port}/0")
    assert record["attempts"] == 1


def start_worker(redis_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`mloc start --node-type worker` against ``redis_url``, in a shell with no other MLOC setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOC_", "REDIS_URL"))}
    env.update({"REDIS_URL": redis_url, "MLOC_HOME": str(tmp_path / "home"), "RESULTS_DIR": str(tmp_path / "results")})
    return subprocess.run(
        [sys.executable, "-m", "mloc.cli", "start", "--node-type", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_with_a_wrong_password_exits_with_one_clear_line(servers: list[Server], tmp_path: Path) -> None:
    port = plain(servers, tmp_path / "r", "--requirepass", "s3cret")
    done = start_worker(f"redis://:wrong-one@127.0.0.1:{port}/0", tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "refused the credentials" in output and "check the user name and password in REDIS_URL" in output
    assert "Traceback" not in output and "wrong-one" not in output


def test_a_url_naming_a_port_that_is_not_redis_says_so_in_one_line(tmp_path: Path) -> None:
    """The orchestrator's own HTTP port, named as REDIS_URL, is the usual mix-up."""
    port = free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.05)
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(ConfigError) as refused:
            asyncio.run(connect(url, attempts=1))
        assert "is not a Redis server" in refused.value.message and "REDIS_URL" in refused.value.message
        done = start_worker(url, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert f"127.0.0.1:{port}/0 is not a Redis server" in output and "Traceback" not in output
    finally:
        http.terminate()
        http.wait()


def test_unreachable_redis_is_retried_with_backoff_until_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    started: list[Server] = []

    # Three failed tries (waits 0.2, 0.4 and 0.8 s) end about 0.6 s in plus the tries' own time, which
    # a busy machine stretches: the server comes later than that.
    late = 1.5

    def start_later() -> None:
        time.sleep(late)
        started.append(Server(tmp_path / "late", "--port", str(port), "--bind", "127.0.0.1"))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="mloc.connection"):
            outcome, took = try_connect(f"redis://127.0.0.1:{port}/0", attempts=0, max_delay=10)
    finally:
        thread.join()
        for server in started:
            server.stop()
    assert outcome == "ok" and took >= late
    delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].rstrip("s")) for r in caplog.records]
    assert len(delays) >= 3 and delays[:3] == [0.2, 0.4, 0.8]
    assert all("cannot reach Redis (redis://127.0.0.1" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)  # one line each, no stack traces
    message, _ = try_connect(f"redis://127.0.0.1:{free_port()}/0", attempts=3)
    assert "after 3 tries" in message and "check that it runs and that this host can reach it" in message


# ------------------------------------------------------------------ closed connections
def _blocked_in(admin: redis.Redis, command: str) -> bool:
    return any(c["cmd"] == command and "b" in c["flags"] for c in admin.client_list())


def test_blocking_reads_carry_on_when_redis_closes_their_connection(servers: list[Server], tmp_path: Path) -> None:
    """The worker waits for assignments in XREADGROUP ... BLOCK and the scheduler for wake-ups on a
    subscription. A connection that Redis (or a proxy) closes under them is opened again and the read
    goes on: it must not end in "Connection closed by server", nor wait out a socket timeout."""
    port = plain(servers, tmp_path / "redis")
    admin = redis.Redis(port=port, decode_responses=True)

    async def go() -> None:
        client = await connect(f"redis://127.0.0.1:{port}/0", settings=Settings(), attempts=1)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await client.xgroup_create("mloc:probe", "g", id="0", mkstream=True)
            read = asyncio.create_task(client.xreadgroup("g", "c", {"mloc:probe": ">"}, count=1, block=10_000))
            while not _blocked_in(admin, "xreadgroup"):
                await asyncio.sleep(0.01)
            assert admin.client_kill_filter(_type="normal", skipme=True) == 1
            admin.xadd("mloc:probe", {"n": "1"})
            started = time.monotonic()
            reply = await asyncio.wait_for(read, 5)
            assert reply and reply[0][1][0][1] == {"n": "1"}
            assert time.monotonic() - started < 2  # reconnected at once, not after a timeout

            await pubsub.subscribe("mloc:probe:wake")
            assert admin.client_kill_filter(_type="pubsub") == 1
            received = None
            deadline = time.monotonic() + 5
            while received is None and time.monotonic() < deadline:
                # The next read notices the close, reconnects and subscribes again; a message
                # published once the subscription is back must arrive.
                if admin.pubsub_numsub("mloc:probe:wake")[0][1]:
                    admin.publish("mloc:probe:wake", "1")
                received = await pubsub.get_message(timeout=0.2)
            assert received is not None and received["data"] == "1"
        finally:
            await pubsub.aclose()
            await client.aclose()

    asyncio.run(go())


# ----------------------------------------------------------------------------- TLS
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(command: str, *extra: str, cwd: Path) -> None:
    subprocess.run(["openssl", *command.split(), *extra], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all made by openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH; install it (apt-get install openssl) to test TLS")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=mloc-test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        request = f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN=mloc-{name}"
        _openssl(request, cwd=d)
        sign = f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 1"
        _openssl(sign, "-extfile", f"{name}.ext", cwd=d)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def tls_server(servers: list[Server], workdir: Path, pki: Pki, *, client_certs: bool) -> int:
    port = free_port()
    server = Server(
        workdir, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes" if client_certs else "no",
    )  # fmt: skip
    probe = redis.Redis(
        port=port,
        ssl=True,
        ssl_ca_certs=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    servers.append(server.wait(probe))
    return port


def test_tls_with_the_ca_works_and_mismatches_say_what_to_change(
    servers: list[Server], tmp_path: Path, pki: Pki
) -> None:
    tls_port = tls_server(servers, tmp_path / "tls", pki, client_certs=False)
    plain_port = plain(servers, tmp_path / "plain")
    with_ca = settings_with(MLOC_REDIS_TLS_CA_FILE=str(pki.ca))
    assert try_connect(f"rediss://127.0.0.1:{tls_port}/0", with_ca)[0] == "ok"
    assert try_connect(f"rediss://localhost:{tls_port}/0", with_ca)[0] == "ok"
    # redis-py's own query parameters work as well, and win over the settings.
    assert try_connect(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={pki.ca}")[0] == "ok"

    no_ca, took = try_connect(f"rediss://127.0.0.1:{tls_port}/0")
    assert "TLS certificate of Redis" in no_ca and "set MLOC_REDIS_TLS_CA_FILE to the CA" in no_ca and took < 3
    plain_to_tls, took = try_connect(f"redis://127.0.0.1:{tls_port}/0")
    assert "expects TLS on that port; use rediss://" in plain_to_tls and took < 5
    # A TLS client waits for a handshake a plain server never answers: the connect timeout bounds it.
    tls_to_plain, took = try_connect(f"rediss://127.0.0.1:{plain_port}/0?socket_connect_timeout=1", with_ca)
    assert "does not speak TLS on that port" in tls_to_plain and "use redis://" in tls_to_plain and took < 6
    unverified = settings_with(MLOC_REDIS_TLS_CERT_REQS="none")
    assert try_connect(f"rediss://127.0.0.1:{tls_port}/0", unverified)[0] == "ok"


def test_mutual_tls_needs_the_client_certificate(servers: list[Server], tmp_path: Path, pki: Pki) -> None:
    port = tls_server(servers, tmp_path / "mtls", pki, client_certs=True)
    url = f"rediss://127.0.0.1:{port}/0"
    without, _ = try_connect(url, settings_with(MLOC_REDIS_TLS_CA_FILE=str(pki.ca)))
    assert "requires a client certificate" in without, without
    assert "set MLOC_REDIS_TLS_CERT_FILE and MLOC_REDIS_TLS_KEY_FILE" in without
    full = settings_with(
        MLOC_REDIS_TLS_CA_FILE=str(pki.ca),
        MLOC_REDIS_TLS_CERT_FILE=str(pki.client_cert),
        MLOC_REDIS_TLS_KEY_FILE=str(pki.client_key),
    )
    assert try_connect(url, full)[0] == "ok"
    assert sync_client(url, full).ping()


def test_full_run_over_tls(servers: list[Server], tmp_path: Path, pki: Pki) -> None:
    port = tls_server(servers, tmp_path / "tls", pki, client_certs=False)
    record = run_one_echo_task(tmp_path, f"rediss://127.0.0.1:{port}/0", {"MLOC_REDIS_TLS_CA_FILE": str(pki.ca)})
    assert record["attempts"] == 1


def test_full_run_over_a_unix_socket(servers: list[Server], tmp_path: Path) -> None:
    """unix:///path/redis.sock, for a Redis on the same host: the clients take no TCP-only option."""
    # A socket path is limited to about 100 bytes, which pytest's own folders can pass.
    folder = Path(tempfile.mkdtemp(prefix="mloc-sock-"))
    try:
        socket_path = folder / "redis.sock"
        server = Server(tmp_path / "r", "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700")
        servers.append(server.wait(redis.Redis(unix_socket_path=str(socket_path))))
        url = f"unix://{socket_path}"
        assert try_connect(url)[0] == "ok"
        assert sync_client(url).ping()
        record = run_one_echo_task(tmp_path, url)
        assert record["attempts"] == 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------ Sentinel
def sentinel(servers: list[Server], workdir: Path, master_port: int, *, master_password: str, password: str) -> int:
    port = free_port()
    conf = (
        f"port {port}\nbind 127.0.0.1\nrequirepass {password}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        f"sentinel auth-pass mymaster {master_password}\n"
        "sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n"
    )
    server = Server(workdir, "--sentinel", conf=conf)
    servers.append(server.wait(redis.Redis(port=port, password=password)))
    return port


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def test_sentinel_url_finds_the_master_and_follows_a_failover(servers: list[Server], tmp_path: Path) -> None:
    master = plain(servers, tmp_path / "master", "--requirepass", "mpw", "--masterauth", "mpw")
    replica = plain(
        servers,
        tmp_path / "replica",
        "--requirepass",
        "mpw",
        "--masterauth",
        "mpw",
        "--replicaof",
        "127.0.0.1",
        str(master),
    )
    port = sentinel(servers, tmp_path / "sentinel", master, master_password="mpw", password="spw")
    url = f"redis+sentinel://:mpw@127.0.0.1:{port}/mymaster/0?sentinel_password=spw"

    client = sync_client(url, Settings())
    client.set("mloc:probe", "1")
    assert redis.Redis(port=master, password="mpw").get("mloc:probe") == b"1"
    wrong, _ = try_connect(f"redis+sentinel://:mpw@127.0.0.1:{port}/othermaster/0?sentinel_password=spw")
    assert "after 2 tries" in wrong and "othermaster" in wrong

    sentinel_admin = redis.Redis(port=port, password="spw", decode_responses=True)
    wait_until(lambda: sentinel_admin.sentinel_slaves("mymaster"), 15, "Sentinel discovering the replica")
    with mloc_on(tmp_path, url) as api:
        before = echo_succeeds(api, "before")
        wait_until(lambda: redis.Redis(port=replica, password="mpw").exists(f"mloc:task:{before['task_id']}"), 10,
                   "replication of the task")  # fmt: skip
        sentinel_admin.execute_command("SENTINEL", "FAILOVER", "mymaster")
        # SENTINEL MASTERS (what clients ask) names the new master once the failover is complete.
        wait_until(lambda: int(sentinel_admin.sentinel_master("mymaster")["port"]) == replica, 30, "switch")
        servers[0].stop()  # the old master goes away: connections to it drop, and clients ask Sentinel again
        wait_until(lambda: api.http.get("/readyz").status_code == 200, 10, "orchestrator reconnecting")
        # The orchestrator and worker that were running reconnect to the new master on their own.
        after = echo_succeeds(api, "after")
        assert after["attempts"] == 1
        assert redis.Redis(port=replica, password="mpw").exists(f"mloc:task:{after['task_id']}")
        assert api.task(before["task_id"])["state"] == "succeeded"  # history survived the failover
    client.set("mloc:probe", "2")  # a client made before the failover follows it too
    assert redis.Redis(port=replica, password="mpw").get("mloc:probe") == b"2"
