"""Faster command encoding for redis-py's asyncio connections.

redis-py's synchronous connections encode commands with hiredis when it is installed; its asyncio
connections always use a pure-Python encoder that copies the growing buffer once per argument. A
task transition sends about seventy arguments, so that encoder was the largest single cost of a
worker finishing a task. This swaps in the hiredis encoder that redis-py ships for the sync client.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class _HiredisPacking:
    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._serializer.pack(*args)


@cache
def _with_hiredis_packing(connection_class: type) -> type:
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


def use_hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """Make ``client``'s future connections encode commands with hiredis (a no-op without it)."""
    pool = client.connection_pool
    if HIREDIS_AVAILABLE and not issubclass(pool.connection_class, _HiredisPacking):
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return client
