"""The worker process's entry point: ``python -m mloc.worker.listener`` (seed 1's
``python -m worker.listener``) connects to Redis and runs a :class:`~mloc.worker.worker.Worker`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from mloc.connection import choose_redis, connect
from mloc.errors import ConfigError
from mloc.settings import NodeType, Settings, get_settings
from mloc.worker.worker import Worker

log = logging.getLogger(__name__)


async def serve(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    choice = choose_redis(settings)
    log.info("%s", choice.describe())
    try:
        redis = await connect(choice.url)
        worker = Worker(settings, redis)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        try:
            await worker.run()
        finally:
            await redis.aclose()
    finally:
        if choice.started is not None:
            choice.started.stop()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (as the orchestrator's uvicorn uses it): each Redis round trip
    costs the worker less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    """``python -m mloc.worker.listener`` (seed 1's ``python -m worker.listener``) and
    ``mloc start --node-type worker``: run a worker in the foreground until SIGINT/SIGTERM."""
    try:
        settings = get_settings()
        settings.setup_logging(NodeType.WORKER)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings))
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
