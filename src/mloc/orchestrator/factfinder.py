"""Where admission finds a model's facts (its architecture and weight sizes) without the weights.

In order: this process's memory; the facts workers publish of the models they hold (their hash's
``model_facts``, asked first of the workers whose ``held_models`` name the model); the facts read from
the hub before (Redis, a day); then, for a Hugging Face id, the hub itself (``config.json`` from
``HF_ENDPOINT``, with a short timeout), or, for an https ``.gguf``, the header at the file's start (a
range read). A local path is read where the orchestrator can see it (after the model-roots check). When
none answers, :class:`Found` says which file could not be read and why.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from mloc import __version__, keys
from mloc.llm.factsources import PACKAGE_PREFIX, facts_key
from mloc.llm.ggufheader import GgufHeaderCut, facts_from_gguf_bytes
from mloc.llm.modelfacts import ModelFacts, ModelFactsError, facts_from_config, model_facts
from mloc.records import MODEL_FACTS, WorkerStatus, WorkerView
from mloc.settings import Settings
from mloc.spec.base import REPO_ID, ModelSource, SourceType

FOUND_TTL_SEC = 300.0
MISSING_TTL_SEC = 30.0
# A worker may publish a model's facts any moment (it just downloaded or built it): after a miss the
# workers are asked again, but not more often than this (a bulk submit asks once).
ASK_AGAIN_SEC = 2.0
STORED_TTL_SEC = 86_400
MEMORY_ENTRIES = 4096
WORKERS_ASKED = 256
# A GGUF header holds the vocabulary: a few MiB for most models; read more only when it goes on.
GGUF_FIRST_BYTES = 1 << 20
GGUF_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Found:
    """A model's facts and where they came from, or (``facts`` None) which file could not be read and why."""

    facts: ModelFacts | None
    origin: str
    problem: str = ""


class _Unread(Exception):
    """A file admission could not read; the message says which and why."""


class FactFinder:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._memory: dict[str, tuple[float, Found]] = {}  # found or missed: until when, what
        self._asked: dict[str, float] = {}  # when the workers were last asked after a miss

    async def find(self, source: ModelSource, views: list[WorkerView]) -> Found:
        """The facts of the model ``source`` names (``views``: the registered workers)."""
        key = facts_key(source)
        local = key is None or (source.type == SourceType.HUGGINGFACE and not REPO_ID.match(source.identifier))
        memo = f"local:{source.identifier}" if local else f"{key}@{source.revision or ''}"
        cached = self._memory.get(memo)
        fresh = cached is not None and cached[0] > time.monotonic()
        if cached is not None and fresh and cached[1].facts is not None:
            return cached[1]
        if local:
            found = cached[1] if cached is not None and fresh else await self._local(source.identifier)
        else:
            assert key is not None
            now = time.monotonic()
            if cached is not None and fresh and now - self._asked.get(memo, 0.0) < ASK_AGAIN_SEC:
                return cached[1]
            self._asked[memo] = now
            published = await self._published(key, views)
            if published is not None:
                found = published
            elif cached is not None and fresh:
                return cached[1]  # the hub is not asked again so soon
            else:
                found = await self._stored(key) or await self._read(source, key)
        ttl = FOUND_TTL_SEC if found.facts is not None and not local else MISSING_TTL_SEC
        if len(self._memory) >= MEMORY_ENTRIES:
            oldest = next(iter(self._memory))
            self._memory.pop(oldest)
            self._asked.pop(oldest, None)
        self._memory[memo] = (time.monotonic() + ttl, found)
        return found

    async def _local(self, identifier: str) -> Found:
        path = Path(identifier).expanduser()
        if not path.exists():
            return Found(None, str(path), f"{path} is not on the orchestrator's disk (the worker reads it)")
        try:
            return Found(await asyncio.to_thread(model_facts, path), str(path))
        except ModelFactsError as exc:
            return Found(None, str(path), exc.message)
        except OSError as exc:
            return Found(None, str(path), f"{path} could not be read: {exc.strerror or exc}")

    async def _published(self, key: str, views: list[WorkerView]) -> Found | None:
        live = [view for view in views if view.status == WorkerStatus.ACTIVE]
        # Workers whose disk holds the model first: they have published its facts if anyone has.
        asked = sorted(live, key=lambda view: key not in view.held_models)[:WORKERS_ASKED]
        if not asked:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for view in asked:
            pipe.hget(keys.worker(view.worker_id), MODEL_FACTS)
        for view, raw in zip(asked, await pipe.execute(), strict=True):
            entry = _json(raw).get(key)
            if entry is None:
                continue
            try:
                facts = ModelFacts.from_wire(entry, source=f"worker {view.worker_id}")
            except ModelFactsError:
                continue  # a worker of another MLOC version: another may still answer
            return Found(facts, f"{facts.source} on worker {view.worker_id}")
        return None

    async def _stored(self, key: str) -> Found | None:
        data = _json(await self.redis.get(keys.model_facts(key)))
        if not data:
            return None
        try:
            facts = ModelFacts.from_wire(data, source=key)
        except ModelFactsError:
            return None
        return Found(facts, facts.source)

    async def _read(self, source: ModelSource, key: str) -> Found:
        if source.type == SourceType.PACKAGE:
            name = key.removeprefix(PACKAGE_PREFIX)
            return Found(
                None,
                name,
                f"packaged model {name}: no worker has published its facts yet (a worker "
                "does once it has built the model)",
            )
        if source.type == SourceType.URL:
            where = source.identifier
            if not where.lower().startswith(("https://", "http://")) or not where.lower().endswith(".gguf"):
                return Found(
                    None,
                    where,
                    f"{where} could not be read: the orchestrator reads only an https .gguf's "
                    "header; a folder's facts come from a worker that has downloaded it",
                )
            reader = self._gguf_facts(where)
        else:
            revision = source.revision or "main"
            where = f"{self.settings.hub_url}/{source.identifier}/resolve/{revision}/config.json"
            if not self.settings.reads_hub:
                return Found(
                    None,
                    where,
                    f"{where} could not be read: the orchestrator does not read the hub "
                    "(MLOC_OFFLINE=1, or HF_HUB_OFFLINE=1 without MLOC_OFFLINE=0)",
                )
            reader = self._config_facts(where)
        limit = self.settings.memfit_fetch_timeout_sec
        try:
            async with asyncio.timeout(limit):
                facts = await reader
        except TimeoutError:
            return Found(
                None, where, f"{where} could not be read: no answer within {limit:g}s (MLOC_MEMFIT_FETCH_TIMEOUT_SEC)"
            )
        except _Unread as exc:
            return Found(None, where, str(exc))
        except ModelFactsError as exc:
            return Found(None, where, exc.message)
        await self.redis.set(keys.model_facts(key), json.dumps(facts.to_wire()), ex=STORED_TTL_SEC)
        return Found(facts, where)

    def _client(self) -> httpx.AsyncClient:
        token = self.settings.hub_token
        headers = {"user-agent": f"mloc/{__version__}"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(follow_redirects=True, headers=headers, timeout=self.settings.memfit_fetch_timeout_sec)

    async def _config_facts(self, url: str) -> ModelFacts:
        async with self._client() as client:
            config = await _get_json(client, url)
            try:
                return facts_from_config(config, source=url)
            except ModelFactsError as problem:
                # Some architectures are sized from their weights: the index holds their total size.
                total = await _index_total(client, url.removesuffix("config.json") + "model.safetensors.index.json")
                if total is None:
                    raise problem from None
                return facts_from_config(config, source=url, weights_bytes=total)

    async def _gguf_facts(self, url: str) -> ModelFacts:
        size = GGUF_FIRST_BYTES
        async with self._client() as client:
            while True:
                data = await _first_bytes(client, url, size)
                try:
                    return facts_from_gguf_bytes(data, url)
                except GgufHeaderCut:
                    if len(data) < size or size >= GGUF_MAX_BYTES:
                        raise
                    size *= 4


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise _Unread(f"{url} could not be read: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        hint = (
            " (a gated or private model: set HF_TOKEN on the orchestrator)"
            if response.status_code in (401, 403)
            else ""
        )
        raise _Unread(f"{url} could not be read: HTTP {response.status_code}{hint}")
    try:
        return response.json()
    except ValueError as exc:
        raise _Unread(f"{url} could not be read: not JSON ({exc})") from exc


async def _index_total(client: httpx.AsyncClient, url: str) -> int | None:
    """The checkpoint's size from its safetensors index, or None."""
    try:
        return int((await _get_json(client, url))["metadata"]["total_size"])
    except (_Unread, KeyError, TypeError, ValueError):
        return None


async def _first_bytes(client: httpx.AsyncClient, url: str, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``url``, whether or not the server honours the range."""
    chunks: list[bytes] = []
    got = 0
    try:
        async with client.stream("GET", url, headers={"range": f"bytes=0-{size - 1}"}) as response:
            if response.status_code not in (200, 206):
                raise _Unread(f"{url} could not be read: HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                got += len(chunk)
                if got >= size:
                    break
    except httpx.HTTPError as exc:
        raise _Unread(f"{url} could not be read: {type(exc).__name__}: {exc}") from exc
    return b"".join(chunks)[:size]


def _json(raw: str | bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
