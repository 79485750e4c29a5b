"""The config stream, agent side: hold the last good NodeConfig, resync whenever possible.

Static stability: nothing here ever drops the config the agent holds. Disconnects, controller
restarts and rejected configs only delay the next update; reconnects back off exponentially with
jitter so a restarted controller is not stampeded by every agent at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as ssl_module
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nodemesh import wire
from nodemesh.errors import ProtocolError
from nodemesh.nodeconfig import NodeConfig

if TYPE_CHECKING:
    from nodemesh.agent.identity_client import AgentIdentity

log = logging.getLogger(__name__)

PING_INTERVAL = 5.0
CONNECT_TIMEOUT = 5.0
BACKOFF_BASE = 0.2
BACKOFF_CAP = 15.0
AUTH_RETRY = 30.0  # a rejected token will not fix itself quickly: retry slowly, don't hammer


class _Rejected(Exception):
    """The controller refused us (bad token, unknown node)."""


class ConfigStream:
    def __init__(
        self,
        controller: tuple[str, int],
        node: str,
        token: str | Callable[[], str],
        on_config: Callable[[NodeConfig], None],
        *,
        ssl: ssl_module.SSLContext | None = None,
        ping_interval: float = PING_INTERVAL,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        auth_retry: float = AUTH_RETRY,
        identity: AgentIdentity | None = None,
    ) -> None:
        # A callable is read at each hello: Kubernetes rotates the projected token in its file.
        self.controller, self.node, self._token = controller, node, token
        self._on_config = on_config
        self._ssl = ssl
        # With an identity, the stream is mTLS with the node certificate (bootstrapped with the
        # token first) and carries this node's CSRs; the token is then never sent again.
        self._identity = identity
        self.ping_interval = ping_interval
        self.backoff_base, self.backoff_cap, self.auth_retry = backoff_base, backoff_cap, auth_retry
        self._version = 0
        self._config: NodeConfig | None = None
        self._connected = False
        self._last_error: str | None = None
        self._connected_once = False  # this session got past authentication
        self.rejected_configs = 0

    @property
    def version(self) -> int:
        """Version of the config in force (0 = none yet)."""
        return self._version

    @property
    def config(self) -> NodeConfig | None:
        """The last config accepted by on_config."""
        return self._config

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str | None:
        return self._last_error

    async def run(self) -> None:
        """Streams configs until cancelled; never returns on its own."""
        attempt = 0
        while True:
            try:
                await self._session()
            except _Rejected as exc:
                self._last_error = str(exc)
                log.error("controller %s:%d rejected node %s: %s (retrying in ~%gs)",
                          *self.controller, self.node, exc, self.auth_retry)
                await asyncio.sleep(self.auth_retry * random.uniform(0.8, 1.2))
                continue
            except Exception as exc:  # whatever ends a session, keep the config and reconnect
                self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                expected = isinstance(exc, (OSError, asyncio.TimeoutError, ProtocolError, EOFError))
                log.log(logging.WARNING if expected else logging.ERROR,
                        "config stream to %s:%d: %s; keeping config version %d",
                        *self.controller, self._last_error, self._version, exc_info=not expected)
            finally:
                self._connected = False
            # a session that got past authentication resets the backoff
            attempt = 0 if self._connected_once else attempt + 1
            # "equal jitter": at least half the capped exponential delay, so retries stay spread out
            delay = min(self.backoff_cap, self.backoff_base * 2 ** attempt)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self) -> None:
        """One connection; always ends by raising (EOF, timeout, rejection, protocol error)."""
        self._connected_once = False
        ident = self._identity
        ssl = self._ssl
        if ident is not None:
            if not ident.has_node_cert():
                from nodemesh.agent.identity_client import BootstrapError
                try:
                    await ident.bootstrap(self.controller)
                except BootstrapError as exc:
                    raise _Rejected(str(exc)) from None
            ssl = ident.stream_ssl()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*self.controller, ssl=ssl), CONNECT_TIMEOUT)
        try:
            hello = {"type": "hello", "node": self.node, "version": self._version}
            if ident is None:  # with an identity the node certificate authenticates us, not the token
                hello["token"] = self._token() if callable(self._token) else self._token
            if ident is not None:
                ident.verify_controller(writer)
            writer.write(wire.encode(hello))
            await writer.drain()
            decoder = wire.FrameDecoder()
            pinger = asyncio.ensure_future(self._ping(writer))
            csrs = asyncio.ensure_future(ident.run_csrs(lambda m: writer.write(wire.encode(m)))) if ident is not None else None
            try:
                while True:
                    # The controller pings every interval: silence for three means a dead peer.
                    # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that lands as
                    # the read completes, and the stream would then outlive its own cancellation.
                    async with asyncio.timeout(3 * self.ping_interval):
                        data = await reader.read(65536)
                    if not data:
                        raise EOFError("controller closed the stream")
                    for msg in decoder.feed(data):
                        self._handle(msg)
            finally:
                pinger.cancel()
                if csrs is not None:
                    csrs.cancel()
        finally:
            writer.close()

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "error":
            raise _Rejected(str(msg.get("reason", "no reason given")))
        if not self._connected_once:
            # Only an authenticated stream sends config or ping: from here on we are connected.
            self._connected_once = self._connected = True
            self._last_error = None
            log.info("config stream to %s:%d up (holding version %d)", *self.controller, self._version)
        if kind == "config":
            self._apply(msg)
        elif kind in ("cert", "csr_refused") and self._identity is not None:
            self._identity.on_message(msg)
        elif kind == "bundle" and self._identity is not None:
            self._identity.on_bundle(msg)
        elif kind != "ping":
            log.debug("ignoring unknown %r message from controller", kind)

    def _apply(self, msg: dict[str, Any]) -> None:
        try:
            cfg = NodeConfig.from_dict(msg["config"])
            if cfg.node != self.node:
                raise ValueError(f"config is for node {cfg.node!r}, not {self.node!r}")
            self._on_config(cfg)
        except Exception as exc:  # a bad config only rejects itself; the old one stays in force
            self.rejected_configs += 1
            self._last_error = f"config version {msg.get('version')} rejected: {exc}"
            log.exception("%s; keeping version %d", self._last_error, self._version)
            return
        self._config, self._version = cfg, cfg.version
        log.info("applied config version %d for %s", cfg.version, self.node)

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            writer.write(wire.encode({"type": "ping"}))
