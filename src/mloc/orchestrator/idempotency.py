"""Idempotent submits: a submit sent again with the same ``Idempotency-Key`` header answers as the
first one did, and stores nothing new.

A client whose submit timed out cannot know whether the task was stored: without a key, its retry
stores the task twice. With one, the orchestrator keeps, per owner and key, a digest of the request,
the ids its tasks were given and, once stored, its answer (for MLOC_IDEMPOTENCY_TTL_SEC). Again:

- the same request once the first was answered: that answer, marked ``Idempotent-Replayed: true``;
- the same request while the first is still being stored: 409 ``idempotency_in_progress``;
- another request under a key already used: 422 ``idempotency_key_reused``;
- the same request after the first one's orchestrator died half way (its claim older than
  :data:`TAKE_OVER_SEC` and unanswered): this one takes over. The ids were fixed when the key was
  claimed, so the tasks the first stored are found by id and answered, and a submit that stored
  nothing runs again under those ids: the task exists once, whoever stored it.

A refused submit (invalid for this orchestrator, over quota) forgets its claim: the key may be sent
again once the cause is fixed. A dry run stores nothing, so it claims no key.

The answer is kept as the submit is answered, not before: the client waits for one round trip less.
Until it is kept, the same request sent to this orchestrator waits for it, and one sent to another
is told the submit is in progress; one that is never kept (Redis failed, the orchestrator stopped)
leaves the claim unanswered, and a later try takes over and answers from the stored tasks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from mloc import keys, lua
from mloc.errors import BadRequest, IdempotencyKeyReused, SubmitInProgress
from mloc.store import TaskStore

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# A claim older than this, still unanswered, was left by an orchestrator that stopped half way: a
# submit takes seconds at most, even a bulk of thousands.
TAKE_OVER_SEC = 60.0

Submit = Callable[[list[str]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Answered:
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class Claim:
    """A key being claimed for a request (:meth:`Idempotency.claim`)."""

    key: str
    marker: str  # the key's hash in Redis
    reply: asyncio.Task[tuple[str, str]]


def checked_key(raw: str) -> str:
    """The key a client sent, or :class:`BadRequest` saying what a key may be. A quoted key (the
    header is a structured-field string in the IETF draft) is taken without its quotes."""
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise BadRequest(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters; send a new random one "
            "(a UUID) with each distinct submit, and the same one when you send that submit again"
        )
    return key


def request_digest(route: str, content_type: str | None, body: bytes) -> str:
    """What identifies a request under its key: the route and the body as sent."""
    digest = hashlib.sha256(route.encode())
    digest.update(b"\0" + (content_type or "").split(";")[0].strip().lower().encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()


class Idempotency:
    def __init__(self, redis: aioredis.Redis, store: TaskStore, ttl_sec: float) -> None:
        self.store = store
        self.ttl_sec = max(1, int(ttl_sec))
        self._claim = redis.register_script(lua.IDEMPOTENCY_CLAIM)
        self._settle = redis.register_script(lua.IDEMPOTENCY_SETTLE)
        self._keeping: dict[str, asyncio.Task[None]] = {}  # marker -> its answer, being kept

    def claim(self, owner: str, key: str, digest: str, count: int) -> Claim:
        """Start claiming ``owner``'s ``key`` for a request that makes ``count`` top-level tasks: one
        round trip, made while the caller goes on (validating the request); :meth:`run` takes the
        reply, or :meth:`drop` where the request is refused first."""
        marker = keys.idempotency(owner, hashlib.sha256(key.encode()).hexdigest())
        claimed = orjson.dumps([str(uuid.uuid4()) for _ in range(count)]).decode()
        return Claim(key, marker, asyncio.create_task(self._claimed(marker, digest, claimed)))

    async def _claimed(self, marker: str, digest: str, claimed: str) -> tuple[str, str]:
        """The claim's status and what goes with it: the answer (done), when (busy), the ids (new, retake)."""
        keeping = self._keeping.get(marker)
        if keeping is not None:  # sent again as its first send was answered: that answer is the one
            await asyncio.wait([keeping])
        reply = await self._claim(
            keys=[marker], args=[digest, claimed, repr(time.time()), self.ttl_sec, repr(TAKE_OVER_SEC)]
        )
        status = _text(reply[0])
        if status == "new":
            return status, claimed
        return status, _text(reply[1]) if len(reply) > 1 else ""

    async def run(self, claim: Claim, submit: Submit, *, bulk: bool) -> Answered:
        """``submit`` (given the task ids to use) once for the claimed key; its answer again for a
        request sent again. ``bulk``: whether it answers as the bulk route does."""
        status, found = await claim.reply
        marker, key = claim.marker, claim.key
        if status == "mismatch":
            raise IdempotencyKeyReused(
                f"{HEADER} {key!r} was sent before with another request (another task, or another route); "
                "send a new key with each distinct submit"
            )
        if status == "done":
            return Answered(orjson.loads(found), replayed=True)
        if status == "busy":
            raise SubmitInProgress(
                f"a submit with {HEADER} {key!r} is still being stored; send it again in a moment for its answer"
            )
        claimed = found  # the ids: this claim's (new), or those of the claim taken over (retake)
        ids = orjson.loads(claimed)
        if status == "retake":
            stored = await self.store.get_many(ids)
            if stored:
                body = _stored_answer(stored, bulk=bulk)
                await self._settle(keys=[marker], args=[claimed, orjson.dumps(body).decode()])
                return Answered(body, replayed=True)
        try:
            body = await submit(ids)
        except Exception:
            # Refused, or Redis failed: the key may be sent again. Where Redis failed after the tasks
            # were stored, the claim stays unanswered and a later try takes over and finds them.
            await self._forget(marker, claimed)
            raise
        self._keep(marker, claimed, orjson.dumps(body).decode())
        return Answered(body)

    async def drop(self, claim: Claim) -> None:
        """The request was refused before its submit: the key may be sent again, where this claimed it."""
        try:
            status, claimed = await claim.reply
            if status in ("new", "retake"):
                await self._forget(claim.marker, claimed)
        except aioredis.RedisError:
            pass  # a claim left unanswered is taken over after TAKE_OVER_SEC

    def _keep(self, marker: str, claimed: str, answer: str) -> None:
        """Keep ``answer`` for the claim while the submit is answered (see the module's docstring)."""
        task = asyncio.create_task(self._kept(marker, claimed, answer))
        self._keeping[marker] = task

        def kept(done: asyncio.Task[None]) -> None:
            if self._keeping.get(marker) is done:
                del self._keeping[marker]

        task.add_done_callback(kept)

    async def _kept(self, marker: str, claimed: str, answer: str) -> None:
        try:
            await self._settle(keys=[marker], args=[claimed, answer])
        except aioredis.RedisError as exc:
            log.warning(
                "a submit's answer was not kept for its %s (%s): sent again, it is answered from its stored tasks "
                "once its claim is %gs old",
                HEADER,
                exc,
                TAKE_OVER_SEC,
            )

    async def close(self, timeout: float = 2.0) -> None:
        """Wait until the answers being kept are, for ``timeout`` seconds at most."""
        if self._keeping:
            await asyncio.wait(list(self._keeping.values()), timeout=timeout)

    async def _forget(self, marker: str, claimed: str) -> None:
        try:
            stored = await self.store.get_many(orjson.loads(claimed))
            if not stored:
                await self._settle(keys=[marker], args=[claimed, ""])
        except aioredis.RedisError:
            pass  # left claimed: a try after TAKE_OVER_SEC takes over and finds what was stored


def _stored_answer(stored: list[Any], *, bulk: bool) -> dict[str, Any]:
    """The answer of a submit whose orchestrator stored its tasks and died before answering, from the
    tasks as they are now."""
    tasks = [
        {"ok": True, "task_id": r.task_id, "worker_id": r.worker_id, "topic": r.topic, "state": str(r.state)}
        for r in stored
    ]
    return {"ok": True, "count": len(tasks), "tasks": tasks} if bulk else tasks[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
