"""Connecting to Redis: URL resolution (explicit, or the local embedded server) and start-up retries."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError

from mloc.errors import ConfigError
from mloc.settings import Settings

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def resolve_url(settings: Settings) -> str:
    """REDIS_URL when set; otherwise the embedded server that `mloc up` or `mloc start` runs here."""
    if settings.redis_url:
        return settings.redis_url
    from mloc.embedded import running_url

    url = running_url(settings.home)
    if url is None:
        raise ConfigError(
            "no REDIS_URL is set and no embedded Redis is running in "
            f"{settings.home}; set REDIS_URL=redis://host:6379/0, or run `mloc up`"
        )
    return url


# redis-py's 5 s default read timeout fails requests on a machine whose CPUs are saturated by model
# work; a slow answer is still an answer. Blocking reads (XREADGROUP, XREAD) block for at most 1 s.
SOCKET_TIMEOUT_SEC = 30.0


def client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
        socket_timeout=SOCKET_TIMEOUT_SEC,
        socket_connect_timeout=10,
        max_connections=256,
    )


async def connect(url: str, *, attempts: int = 0, max_delay: float = 10.0) -> aioredis.Redis:
    """Connect and PING, retrying with backoff (forever when ``attempts`` is 0). A wrong password
    or protocol mismatch is not retried: it will not fix itself."""
    delay = 0.2
    tried = 0
    while True:
        redis = client(url)
        try:
            await redis.ping()
            return redis
        except AuthenticationError as exc:
            await redis.aclose()
            raise ConfigError(
                f"Redis at {redact(url)} refused the credentials: {exc}; check the password in REDIS_URL"
            ) from exc
        except ResponseError as exc:
            await redis.aclose()
            raise ConfigError(f"Redis at {redact(url)} answered with an error: {exc}") from exc
        except (ConnectionError, TimeoutError, OSError) as exc:
            await redis.aclose()
            tried += 1
            hint = ""
            if "SSL" in str(exc) or "record layer" in str(exc):
                hint = " (TLS mismatch? use rediss:// for a TLS port and redis:// otherwise)"
            if attempts and tried >= attempts:
                raise ConfigError(f"cannot reach Redis at {redact(url)}: {exc}{hint}") from exc
            log.warning("cannot reach Redis at %s: %s%s; retrying in %.1fs", redact(url), exc, hint, delay)
            await asyncio.sleep(delay)
            delay = min(max_delay, delay * 2)


def wait_ready(url: str, timeout: float = 10.0) -> None:
    """Block until Redis at ``url`` answers (used right after starting an embedded server)."""
    import redis as syncredis

    deadline = time.monotonic() + timeout
    while True:
        try:
            syncredis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            return
        except (ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
