"""API users: the admin (ORCHESTRATOR_TOKEN) and per-user tokens, stored only as hashes (issued,
rotated, revoked), and each user's quota (tasks assigned or running at once, GPUs held at once)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, lua
from mloc.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from mloc.records import ADMIN
from mloc.spec.base import check_name


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
    scheme = header.split(None, 1)[0] if header and header.strip() else ""
    if scheme and scheme.lower() != "bearer":
        raise Unauthorized(
            f"the Authorization header uses the {scheme[:20]!r} scheme; send 'Authorization: Bearer <token>'"
        )
    if not header or not header.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token; send 'Authorization: Bearer <token>'")
    token = header[7:].strip()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(ADMIN, admin=True)
    user = await redis.get(keys.user_token(hash_token(token)))
    if user is None:
        raise Unauthorized(
            "invalid token (unknown, or replaced by a newer one); ask the admin for your current token: "
            "`mloc users rotate-token NAME` for a user, `mloc users add NAME` for a new one. The admin's token "
            "is the orchestrator's ORCHESTRATOR_TOKEN, exactly as it was set"
        )
    return Principal(user, admin=False)


@dataclass(frozen=True)
class Quota:
    """A user's limits; None means the default (MLOC_USER_MAX_TASKS / MLOC_USER_MAX_GPUS), 0 unlimited."""

    max_tasks: int | None = None
    max_gpus: int | None = None


def _check_user_name(name: str) -> None:
    try:
        check_name(name, "user name")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


async def add_user(redis: aioredis.Redis, name: str, quota: Quota | None = None) -> str:
    """Create a user and return its token; only the hash is stored, so it is shown once."""
    _check_user_name(name)
    if name == ADMIN:
        raise Conflict("'admin' is reserved for the ORCHESTRATOR_TOKEN holder")
    token = "mloc_" + secrets.token_urlsafe(32)
    record = json.dumps({"name": name, "created_at": time.time(), "token_hash": hash_token(token)})
    if not await redis.hsetnx(keys.USERS, name, record):
        raise Conflict(
            f"user {name!r} exists; `mloc users rotate-token {name}` (POST /admin/users/{name}/token) issues "
            "a new token and keeps their quota, budgets and weight"
        )
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.user_token(hash_token(token)), name)
    # A quota, budgets or weight left behind by an earlier user of the same name do not carry over.
    pipe.delete(keys.user_quota(name), keys.user_budget(name))
    pipe.hdel(keys.user_fair_share(name), "weight")
    await pipe.execute()
    if quota is not None:
        await set_quota(redis, name, quota)
    return token


async def remove_user(redis: aioredis.Redis, name: str) -> None:
    """Forget a user: their token stops working at once, and their quota, budgets and weight go.
    Their tasks are the caller's to settle (:func:`mloc.orchestrator.cancel.cancel_unstarted`)."""
    raw = await redis.hget(keys.USERS, name)
    if raw is None:
        raise NotFound(f"user {name!r} not found")
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.user_token(json.loads(raw)["token_hash"]), keys.user_quota(name), keys.user_budget(name))
    pipe.hdel(keys.user_fair_share(name), "weight")
    pipe.hdel(keys.USERS, name)
    await pipe.execute()


async def rotate_token(redis: aioredis.Redis, name: str) -> str:
    """Issue a new token for ``name`` and revoke the old one in the same atomic step; the user's
    quota, budgets, weight and tasks stay as they are. Returns the token (only its hash is stored)."""
    if name == ADMIN:
        raise BadRequest("the admin's token is ORCHESTRATOR_TOKEN: change it in the orchestrator's environment")
    rotate = redis.register_script(lua.ROTATE_TOKEN)
    for _ in range(5):
        raw = await redis.hget(keys.USERS, name)
        if raw is None:
            raise NotFound(f"user {name!r} not found; add it with `mloc users add {name}`")
        record = json.loads(raw)
        token = "mloc_" + secrets.token_urlsafe(32)
        old_hash, new_hash = record["token_hash"], hash_token(token)
        record.update(token_hash=new_hash, rotated_at=time.time())
        token_keys = [keys.USERS, keys.user_token(old_hash), keys.user_token(new_hash)]
        if await rotate(keys=token_keys, args=[name, raw, json.dumps(record)]):
            return token
    raise Conflict(f"user {name!r} changed under every try to rotate their token; try again")


async def require_user(redis: aioredis.Redis, name: str) -> None:
    """Raise :class:`NotFound` unless ``name`` is the admin or a user: a read of an unknown user's
    quota or budgets answers as a write to them does, not with defaults that look set."""
    if name != ADMIN and not await redis.hexists(keys.USERS, name):
        raise NotFound(f"user {name!r} not found; add it first with `mloc users add {name}`")


async def set_quota(redis: aioredis.Redis, name: str, quota: Quota, *, reset: bool = False) -> None:
    """Set a user's limits (fields left None are kept; ``reset`` first returns both to the defaults).
    The scheduler reads them at each placement, so a change applies to the next task placed."""
    await require_user(redis, name)
    pipe = redis.pipeline(transaction=True)
    if reset:
        pipe.delete(keys.user_quota(name))
    values = {"tasks": quota.max_tasks, "gpus": quota.max_gpus}
    for field, value in values.items():
        if value is not None:
            if value < 0:
                raise BadRequest(f"max_{field} is {value}; give 0 (unlimited) or more")
            pipe.hset(keys.user_quota(name), field, str(value))
    await pipe.execute()


async def check_gpu_quota(redis: aioredis.Redis, owner: str, gpu_count: int, *, default_gpus: int) -> None:
    """Refuse a task asking for more GPUs than its owner may hold at once: it could never start, and
    would wait for ever. Asks Redis only for GPU tasks."""
    if gpu_count <= 0:
        return
    own = await redis.hget(keys.user_quota(owner), "gpus")
    most = default_gpus if own is None else int(own)
    if 0 < most < gpu_count:
        whose = " (the default, MLOC_USER_MAX_GPUS)" if own is None else ""
        raise Forbidden(
            f"spec.resources.hardware.gpu.count is {gpu_count}, but user {owner}'s quota allows {most} GPU"
            f"{'s' if most != 1 else ''} held at once{whose}, so the task could never start; ask the admin to "
            f"raise it (`mloc users set-quota {owner} --max-gpus {gpu_count}`), or ask for at most {most}"
        )


async def usage_and_quota(
    redis: aioredis.Redis, names: list[str], *, default_tasks: int, default_gpus: int
) -> dict[str, dict[str, Any]]:
    """What each user holds now and the limits that apply to them, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hmget(keys.user_usage(name), "tasks", "gpus")
        pipe.hmget(keys.user_quota(name), "tasks", "gpus")
    replies = await pipe.execute()
    answer = {}
    for index, name in enumerate(names):
        (tasks, gpus), (max_tasks, max_gpus) = replies[2 * index], replies[2 * index + 1]
        answer[name] = {
            "usage": {"tasks": int(tasks or 0), "gpus": int(gpus or 0)},
            "quota": {
                "max_tasks": int(max_tasks) if max_tasks is not None else default_tasks,
                "max_gpus": int(max_gpus) if max_gpus is not None else default_gpus,
                "max_tasks_is_default": max_tasks is None,
                "max_gpus_is_default": max_gpus is None,
            },
        }
    return answer


async def list_users(redis: aioredis.Redis, *, default_tasks: int = 0, default_gpus: int = 0) -> list[dict[str, Any]]:
    rows = await redis.hgetall(keys.USERS)
    names = sorted(rows)
    state = await usage_and_quota(redis, names, default_tasks=default_tasks, default_gpus=default_gpus)
    return [{"name": name, "created_at": json.loads(rows[name])["created_at"], **state[name]} for name in names]
