"""The controller process: file source -> config store -> config stream, plus the admin server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvloop

from nodemesh.errors import NodemeshError
from nodemesh.model import DEFAULT_TRUST_DOMAIN

from nodemesh.controller.admin import serve_controller_admin
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.file_source import DirSource
from nodemesh.controller.stream_server import StreamServer, load_tokens

log = logging.getLogger("nodemesh.controller")


async def serve(
    state_dir: str,
    listen: tuple[str, int],
    admin: tuple[str, int],
    tokens_file: str,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> None:
    """Runs the controller until SIGTERM/SIGINT (or until cancelled), then shuts down cleanly."""
    tokens = load_tokens(tokens_file)  # fail fast: without tokens no agent can ever connect
    store = ConfigStore()
    source = DirSource(state_dir, store.update, trust_domain=trust_domain)
    stream = StreamServer(store, tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    admin_server = await serve_controller_admin(*admin, store, stream, lambda: source.errors_total)
    try:
        await stream.start(*listen)
        watch = asyncio.create_task(source.run(), name="file-source")
        log.info("controller up: config stream on %s:%d, admin on %s:%d, state from %s, %d node tokens",
                 listen[0], stream.port, admin[0], admin_server.sockets[0].getsockname()[1], state_dir, len(tokens))
        try:
            await stop.wait()
            log.info("signal received; shutting down")
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    finally:
        await stream.close()
        admin_server.close()
        for sig in handled:
            loop.remove_signal_handler(sig)


def run(
    state_dir: str,
    listen: tuple[str, int] = ("0.0.0.0", 8086),
    admin: tuple[str, int] = ("0.0.0.0", 9990),
    tokens_file: str = "tokens.json",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    log_level: str = "INFO",
) -> None:
    """Entry point for the CLI: logs to stderr and runs `serve` on uvloop."""
    logging.basicConfig(stream=sys.stderr, level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(serve(state_dir, listen, admin, tokens_file, trust_domain))
    except NodemeshError as exc:  # one clear sentence, no traceback
        log.error("%s", exc)
        sys.exit(exc.exit_code)
