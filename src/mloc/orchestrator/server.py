"""Start the orchestrator: ``python -m mloc.orchestrator.server`` (seed 1's ``python -m orchestrator.server``),
the same process as ``mloc start --node-type orchestrator``.

It reads the seeds' variables (REDIS_URL / MLOC_REDIS_URL, ORCHESTRATOR_TOKEN, HEARTBEAT_TTL_SEC,
PORT / MLOC_PORT, MLOC_HOST, LOG_LEVEL / MLOC_LOG_LEVEL, MLOC_LOG_FILE). With no Redis URL it uses a
Redis answering at redis://localhost:6379, else starts the embedded one, and logs which.
"""

from __future__ import annotations

import logging
import signal
import sys

from mloc.errors import ConfigError
from mloc.settings import NodeType, Settings, get_settings

log = logging.getLogger("mloc.orchestrator")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


# Seconds open connections get to finish when the orchestrator stops.
SHUTDOWN_CONNECTIONS_SEC = 3
# The exit code of a server that could not start (a port taken meanwhile), as uvicorn.run gives it.
STARTUP_FAILED = 3


def serve(settings: Settings) -> None:
    """Run the orchestrator in the foreground until SIGINT/SIGTERM; raises ConfigError on bad set-up, and
    where an orchestrator running on the same Redis applies other fleet-wide settings."""
    import asyncio

    import uvicorn
    from uvicorn.loops.auto import auto_loop_factory

    from mloc.api import create_app
    from mloc.connection import choose_redis, connect
    from mloc.orchestrator.orchestrator import Orchestrator

    choice = choose_redis(settings)
    log.info("%s", choice.describe())
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default action that
    # would end the process before the embedded Redis it started is stopped below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        settings = settings.model_copy(update={"redis_url": choice.url})

        async def run() -> None:
            # Retries while Redis is unreachable, stops at once on a wrong password: before serving.
            client = await connect(choice.url)
            orchestrator = Orchestrator(client, settings)
            try:
                check_port(settings.host, settings.port)
                # Joined before the port is bound, in the loop that then serves (the record is renewed
                # there): one refused has answered no request and written nothing, also when it started
                # in the same moment as the one it differs from.
                await orchestrator.join()
                config = uvicorn.Config(
                    create_app(settings, orchestrator=orchestrator),
                    host=settings.host,
                    port=settings.port,
                    log_level=settings.log_level.lower(),
                    access_log=False,
                    # A followed log or a --wait never closes by itself, and uvicorn waits for open
                    # connections: past this, they are cut (their clients say the orchestrator went away).
                    timeout_graceful_shutdown=SHUTDOWN_CONNECTIONS_SEC,
                    # MLOC's logging set-up (file, JSON lines, level) stays in force.
                    log_config=None,
                )
                server = uvicorn.Server(config)
                await server.serve()
                if not server.started:
                    # As uvicorn.run: its start-up failed, and it logged why.
                    raise SystemExit(STARTUP_FAILED)
            finally:
                await orchestrator.leave()
                await client.aclose()

        # uvicorn's own choice of event loop (uvloop where installed), as uvicorn.run would make it.
        with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
            runner.run(run())
    finally:
        if choice.started is not None:
            choice.started.stop()


def check_port(host: str, port: int) -> None:
    """ConfigError naming the port and the fix when another process listens there; uvicorn would log
    the bind error and exit with a bare code."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a stopped orchestrator is free to take.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            raise ConfigError(
                f"port {port} on {host} is in use by another process (another orchestrator or `mloc up`?); "
                "stop it, or choose another port with PORT / MLOC_PORT (`mloc up --port N`)"
            ) from None


def main() -> None:
    try:
        settings = get_settings()
        settings.setup_logging(NodeType.ORCHESTRATOR)
        serve(settings)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
