"""The orchestrators on one Redis: each running orchestrator's presence record, and the start-up check
that keeps them applying the same fleet-wide settings.

Every orchestrator's reaper and scheduler act on state the whole fleet shares (every task's retention,
every worker's liveness, the stored fair-share half-life), so two orchestrators with different values
fight over it: the one with the shorter retention removes the other's finished tasks. A running
orchestrator therefore keeps a record in Redis, renewed every :data:`REFRESH_SEC` and expiring after
:data:`EXPIRY_REFRESHES` of them, and deletes it when it stops. A starting one compares its settings
with every live record and refuses to start where any differs. Workers read the records too: whether
any orchestrator uses their Redis and database, and the heartbeat TTL they must beat within.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from mloc import __version__, keys
from mloc.errors import ConfigError
from mloc.records import OrchestratorRecord
from mloc.settings import Settings

log = logging.getLogger(__name__)

# How often a running orchestrator writes its record again, and after how many missed writes the
# record expires: a crashed orchestrator's record holds a restart with other settings back this long.
REFRESH_SEC = 5.0
EXPIRY_REFRESHES = 3
# How often a starting orchestrator reads a differing record again while it waits to learn whether
# its orchestrator runs (the record is written again) or has crashed (the record expires).
POLL_SEC = 0.25

# The settings that act on state every orchestrator shares, by the variable an operator sets, with
# the Settings field that holds each. Per-submit defaults (retries, timeouts, memory fit) are left out:
# they are written into each task, which then behaves alike whichever orchestrator handles it.
FLEET_SETTINGS: dict[str, str] = {
    # The reaper removes every finished task older than this, whoever submitted it.
    "MLOC_TASK_RETENTION_SEC": "task_retention_sec",
    # The reaper declares any worker silent this long lost and requeues its tasks.
    "HEARTBEAT_TTL_SEC": "heartbeat_ttl_sec",
    # Stored in Redis for the transition script: every process decays fair-share usage with it.
    "MLOC_FAIR_SHARE_HALF_LIFE_SEC": "fair_share_half_life_sec",
    # How many times the reaper requeues a lost worker's task before it fails it.
    "MLOC_MAX_REQUEUES": "max_requeues",
    # The quotas of users without their own, enforced on every placement any scheduler makes.
    "MLOC_USER_MAX_TASKS": "user_max_tasks",
    "MLOC_USER_MAX_GPUS": "user_max_gpus",
    # When the one backfill hold (mloc:backfill:hold) is taken, which every scheduler obeys.
    "MLOC_BACKFILL_AFTER_SEC": "backfill_after_sec",
}


def fleet_settings(settings: Settings) -> dict[str, float]:
    """This process's fleet-wide settings, by variable name."""
    return {variable: getattr(settings, name) for variable, name in FLEET_SETTINGS.items()}


def token_digest(settings: Settings) -> str:
    """A short digest of ORCHESTRATOR_TOKEN ("" with none): enough to tell two tokens apart, never the token."""
    token = settings.admin_token
    if not token:
        return ""
    return hashlib.sha256(b"mloc orchestrator token\0" + token.encode()).hexdigest()[:12]


def shown(value: float) -> str:
    """A setting's value as an operator writes it: 60, not 60.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def record_of(settings: Settings, *, refresh_sec: float) -> OrchestratorRecord:
    """This process's presence record, under a new id."""
    now = time.time()
    return OrchestratorRecord(
        orchestrator_id=uuid.uuid4().hex[:12],
        host=socket.gethostname(),
        pid=os.getpid(),
        port=settings.port,
        started_at=now,
        version=__version__,
        settings=fleet_settings(settings),
        token=token_digest(settings),
        refresh_sec=refresh_sec,
        refreshed_at=now,
    )


@dataclass
class Seen:
    """A live orchestrator's record as read, and how long until it expires unless written again."""

    record: OrchestratorRecord
    expires_in: float  # seconds


async def live(redis: aioredis.Redis) -> list[Seen]:
    """Every orchestrator whose record has not expired, the first started first. The index entries of
    expired records are removed on the way."""
    ids = await redis.zrange(keys.ORCHESTRATORS, 0, -1)
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for orchestrator_id in ids:
        pipe.get(keys.orchestrator(orchestrator_id))
        pipe.pttl(keys.orchestrator(orchestrator_id))
    replies = await pipe.execute()
    found: list[Seen] = []
    gone: list[str] = []
    for index, orchestrator_id in enumerate(ids):
        raw, pttl = replies[2 * index], replies[2 * index + 1]
        record = OrchestratorRecord.decode(raw) if raw is not None else None
        if record is None:
            if raw is None:
                gone.append(orchestrator_id)
            continue
        found.append(Seen(record, max(0.0, pttl / 1000) if pttl and pttl > 0 else 0.0))
    if gone:
        # Its orchestrator, should it run after all, adds its id back with its next write.
        await redis.zrem(keys.ORCHESTRATORS, *gone)
    return found


def differences(mine: OrchestratorRecord, theirs: OrchestratorRecord) -> list[tuple[str, float, float]]:
    """(variable, value here, value there) for each fleet-wide setting both know and set apart."""
    both = [variable for variable in FLEET_SETTINGS if variable in mine.settings and variable in theirs.settings]
    return [
        (variable, mine.settings[variable], theirs.settings[variable])
        for variable in both
        if mine.settings[variable] != theirs.settings[variable]
    ]


def _differing(mine: OrchestratorRecord, theirs: OrchestratorRecord) -> str:
    return ", ".join(
        f"{variable} is {shown(here)} here but {shown(there)} there"
        for variable, here, there in differences(mine, theirs)
    )


def refusal(mine: OrchestratorRecord, conflicts: list[OrchestratorRecord]) -> ConfigError:
    """The one error a starting orchestrator stops with: each setting, both values, the other
    orchestrator, and the fix."""
    parts = [f"{theirs.named()}: {_differing(mine, theirs)}" for theirs in conflicts]
    return ConfigError(
        "this orchestrator's fleet-wide settings differ from those of the orchestrators already running on "
        f"this Redis, which would act on the same tasks and workers with other values; {'; '.join(parts)}. "
        "Set the same values on every orchestrator, or stop the others first (then this one's values apply)"
    )


class Presence:
    """One orchestrator's presence record: the start-up check, its announcement, its renewal, its removal."""

    def __init__(self, redis: aioredis.Redis, record: OrchestratorRecord) -> None:
        self.redis = redis
        self.record = record
        self.announced = False

    @classmethod
    def of(cls, redis: aioredis.Redis, settings: Settings) -> Presence:
        return cls(redis, record_of(settings, refresh_sec=REFRESH_SEC))

    @property
    def key(self) -> str:
        return keys.orchestrator(self.record.orchestrator_id)

    @property
    def expiry_ms(self) -> int:
        return max(1, int(self.record.refresh_sec * EXPIRY_REFRESHES * 1000))

    async def check(self) -> list[Seen]:
        """The other live orchestrators, once none applies other fleet-wide settings.

        A differing record may be a crashed orchestrator's, left until it expires: it is waited out. One
        written again meanwhile has a running orchestrator behind it, and this one is refused with
        :class:`ConfigError`.
        """
        first_seen: dict[str, float] = {}  # a differing orchestrator's id -> its refreshed_at when first read
        while True:
            others = [s for s in await live(self.redis) if s.record.orchestrator_id != self.record.orchestrator_id]
            conflicts = [s for s in others if differences(self.record, s.record)]
            if not conflicts:
                return others
            running = [
                s
                for s in conflicts
                if s.record.orchestrator_id in first_seen
                and first_seen[s.record.orchestrator_id] != s.record.refreshed_at
            ]
            if running:
                raise refusal(self.record, [s.record for s in conflicts])
            for seen in conflicts:
                if seen.record.orchestrator_id in first_seen:
                    continue
                first_seen[seen.record.orchestrator_id] = seen.record.refreshed_at
                log.warning(
                    "%s applies other fleet-wide settings (%s); waiting up to %.1fs to learn whether it runs: "
                    "its record expires then unless it writes it again, as a crashed orchestrator would not. "
                    "Written again, this orchestrator stops; expired, it starts with its own values",
                    seen.record.named(),
                    _differing(self.record, seen.record),
                    seen.expires_in,
                )
            await asyncio.sleep(POLL_SEC)

    async def _announce(self) -> list[Seen] | None:
        """Write this record, unless an orchestrator with other settings appeared since :meth:`check`;
        the others live, or None to check again. Watching the index makes the two atomic: an
        orchestrator announcing itself meanwhile adds its id there, and this write is then not made."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.ORCHESTRATORS)
                ids = [i for i in await pipe.zrange(keys.ORCHESTRATORS, 0, -1) if i != self.record.orchestrator_id]
                raws = await pipe.mget([keys.orchestrator(i) for i in ids]) if ids else []
                others = [record for raw in raws if raw and (record := OrchestratorRecord.decode(raw))]
                if any(differences(self.record, record) for record in others):
                    return None
                pipe.multi()
                self.record.refreshed_at = time.time()
                pipe.set(self.key, self.record.encode(), px=self.expiry_ms)
                pipe.zadd(keys.ORCHESTRATORS, {self.record.orchestrator_id: self.record.started_at})
                await pipe.execute()
            except aioredis.WatchError:
                return None
        self.announced = True
        return [Seen(record, 0.0) for record in others]

    async def admit(self) -> None:
        """Join the orchestrators on this Redis: check (waiting out crashed ones' records), then announce
        this one. Raises :class:`ConfigError` where a running orchestrator applies other settings."""
        while True:
            await self.check()
            others = await self._announce()
            if others is not None:
                break
        for seen in others:
            if seen.record.token != self.record.token:
                log.warning(
                    "%s uses another ORCHESTRATOR_TOKEN than this one (%s): an admin token one of them takes the "
                    "other refuses; set the same ORCHESTRATOR_TOKEN on every orchestrator",
                    seen.record.named(),
                    _token_pair(self.record.token, seen.record.token),
                )
        log.info(
            "this is %s; %d other orchestrator(s) run on this Redis, with the same fleet-wide settings",
            self.record.named(),
            len(others),
        )

    async def refresh(self) -> None:
        """Write the record again, with a fresh expiry; its id goes back into the index if a reader took
        it out (a record that had expired while Redis was away, or was flushed)."""
        self.record.refreshed_at = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key, self.record.encode(), px=self.expiry_ms)
        # An unchanged score leaves the index untouched, so a starting orchestrator's watch holds.
        pipe.zadd(keys.ORCHESTRATORS, {self.record.orchestrator_id: self.record.started_at})
        await pipe.execute()

    async def keep(self) -> None:
        """Renew the record every :data:`REFRESH_SEC` until cancelled."""
        while True:
            await asyncio.sleep(self.record.refresh_sec)
            try:
                await self.refresh()
            except aioredis.RedisError as exc:
                log.warning("orchestrator record: Redis unavailable (%s); writing it again shortly", exc)

    async def withdraw(self) -> None:
        """Delete the record (a clean stop): another orchestrator may then start with other settings at once."""
        if not self.announced:
            return
        self.announced = False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key)
        pipe.zrem(keys.ORCHESTRATORS, self.record.orchestrator_id)
        await pipe.execute()


def _token_pair(here: str, there: str) -> str:
    def one(digest: str, where: str) -> str:
        return f"digest {digest} {where}" if digest else f"none set {where}"

    return f"{one(here, 'here')}, {one(there, 'there')}"


def heartbeat_ttl(seen: list[Seen]) -> float | None:
    """The shortest HEARTBEAT_TTL_SEC of the live orchestrators (None when none says): the silence after
    which a worker is declared lost."""
    ttls = [s.record.settings["HEARTBEAT_TTL_SEC"] for s in seen if "HEARTBEAT_TTL_SEC" in s.record.settings]
    return min(ttls) if ttls else None
