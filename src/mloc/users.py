"""API users: the admin (ORCHESTRATOR_TOKEN) and per-user tokens, stored only as hashes."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from mloc import keys
from mloc.errors import Conflict, NotFound, Unauthorized
from mloc.spec.base import check_name

ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def authenticate(redis: aioredis.Redis, admin_token: str | None, header: str | None) -> Principal:
    """Who is calling. With no admin token configured, auth is off and everyone is the admin."""
    if admin_token is None:
        return Principal(ADMIN, admin=True)
    if not header or not header.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token; send 'Authorization: Bearer <token>'")
    token = header[7:].strip()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(ADMIN, admin=True)
    user = await redis.get(keys.user_token(hash_token(token)))
    if user is None:
        raise Unauthorized("invalid token; ask the admin for a token (`mloc users add NAME`)")
    return Principal(user, admin=False)


async def add_user(redis: aioredis.Redis, name: str) -> str:
    """Create a user and return its token; only the hash is stored, so it is shown once."""
    check_name(name, "user name")
    if name == ADMIN:
        raise Conflict("'admin' is reserved for the ORCHESTRATOR_TOKEN holder")
    token = "mloc_" + secrets.token_urlsafe(32)
    record = json.dumps({"name": name, "created_at": time.time(), "token_hash": hash_token(token)})
    if not await redis.hsetnx(keys.USERS, name, record):
        raise Conflict(f"user {name!r} exists; remove it first to issue a new token")
    await redis.set(keys.user_token(hash_token(token)), name)
    return token


async def remove_user(redis: aioredis.Redis, name: str) -> None:
    raw = await redis.hget(keys.USERS, name)
    if raw is None:
        raise NotFound(f"user {name!r} not found")
    await redis.delete(keys.user_token(json.loads(raw)["token_hash"]))
    await redis.hdel(keys.USERS, name)


async def list_users(redis: aioredis.Redis) -> list[dict[str, object]]:
    rows = await redis.hgetall(keys.USERS)
    return [{"name": name, "created_at": json.loads(raw)["created_at"]} for name, raw in sorted(rows.items())]
