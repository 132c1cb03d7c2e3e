"""The Idempotency-Key claim (mloc.orchestrator.idempotency) on a real Redis: claimed while the request
is checked, dropped when the request is refused first, and its answer kept once the submit is answered."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from mloc import keys
from mloc.orchestrator.idempotency import Idempotency
from mloc.store import TaskStore

Scenario = Callable[[aioredis.Redis, Idempotency], Awaitable[None]]


def run(redis_url: str, scenario: Scenario) -> None:
    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await scenario(r, Idempotency(r, TaskStore(r), ttl_sec=3600))
        finally:
            await r.aclose()

    asyncio.run(main())


def marker(key: str, owner: str = "alice") -> str:
    return keys.idempotency(owner, hashlib.sha256(key.encode()).hexdigest())


class Submits:
    """A submit that answers with the ids it is given, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, ids: list[str]) -> dict[str, Any]:
        self.calls.append(ids)
        return {"ok": True, "task_id": ids[0]}


def test_a_request_sent_again_as_the_first_is_answered_gets_that_answer(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, idem: Idempotency) -> None:
        submit = Submits()
        first = await idem.run(idem.claim("alice", "k", "digest", 1), submit, bulk=False)
        # Sent again at once, before the first answer is kept in Redis: it waits for it.
        again = await idem.run(idem.claim("alice", "k", "digest", 1), submit, bulk=False)
        assert again.replayed and not first.replayed and again.body == first.body
        assert len(submit.calls) == 1
        await idem.close()
        assert json.loads(await r.hget(marker("k"), "answer")) == first.body

    run(redis_url, scenario)


def test_a_request_refused_before_its_submit_leaves_its_key_free(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, idem: Idempotency) -> None:
        claim = idem.claim("alice", "k", "digest", 1)
        await idem.drop(claim)
        assert not await r.exists(marker("k"))
        # Sent again, fixed: a request of its own, not a replay and not a mismatch.
        fixed = await idem.run(idem.claim("alice", "k", "other digest", 1), Submits(), bulk=False)
        assert not fixed.replayed
        await idem.close()

    run(redis_url, scenario)


def test_dropping_a_claim_that_found_an_answer_keeps_the_answer(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, idem: Idempotency) -> None:
        await idem.run(idem.claim("alice", "k", "digest", 1), Submits(), bulk=False)
        await idem.close()
        kept = await r.hgetall(marker("k"))
        # The same key sent again with a request refused before its submit: the first answer stays.
        await idem.drop(idem.claim("alice", "k", "digest", 1))
        await idem.drop(idem.claim("alice", "k", "another request", 1))
        assert await r.hgetall(marker("k")) == kept

    run(redis_url, scenario)


def test_a_claim_gives_the_ids_its_submit_stores_under(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, idem: Idempotency) -> None:
        claim = idem.claim("alice", "k", "digest", 2)
        status, ids = await claim.reply
        assert status == "new" and await r.hget(marker("k"), "ids") == ids
        submit = Submits()
        await idem.run(claim, submit, bulk=True)
        assert submit.calls == [json.loads(ids)] and len(submit.calls[0]) == 2
        await idem.close()

    run(redis_url, scenario)
