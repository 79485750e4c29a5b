"""The config stream, controller side: authenticate an agent, then push its node's config.

Protocol and framing are `nodemesh.wire` (sans-IO); this module only moves frames over asyncio
streams. Transport creation is in `StreamServer.start` alone, so mTLS is one `ssl=` argument.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl as ssl_module
from collections import Counter
from collections.abc import Mapping
from typing import Any

from nodemesh import wire
from nodemesh.errors import ConfigError, ProtocolError
from nodemesh.nodeconfig import NodeConfig

from nodemesh.controller.agent_auth import AgentAuthenticator, AgentAuthRefused, StaticTokens
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.identity_service import BootstrapRefused, IdentityService

log = logging.getLogger(__name__)

PING_INTERVAL = 5.0
HELLO_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # an agent that reads nothing for this long is dropped, not waited on forever
AGENT_MAX_FRAME = 64 * 1024  # agents only send hello and ping: nobody makes us buffer more


def load_tokens(path: str) -> dict[str, str]:
    """Reads the bootstrap tokens file: a JSON object mapping node name -> token."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror}; `nodemesh lab up` writes it", source=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"is not valid JSON: {exc}", source=path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise ConfigError('must be a JSON object mapping node names to non-empty token strings, e.g. {"node1": "..."}', source=path)
    return data


class _Conn:
    """One agent connection: frames in and out over a stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder(max_frame)
        self.pending: list[dict[str, Any]] = []

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None on EOF."""
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(wire.encode(msg))
        try:
            await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConnectionError(f"peer read nothing for {SEND_TIMEOUT:.0f}s") from None


class StreamServer:
    """Serves the config stream to the agents `authenticator` accepts (default: the static `tokens`,
    node -> token). Counters are read by the admin metrics."""

    def __init__(self, store: ConfigStore, tokens: Mapping[str, str] | None = None, ping_interval: float = PING_INTERVAL,
                 identity: IdentityService | None = None, authenticator: AgentAuthenticator | None = None) -> None:
        self.store = store
        if authenticator is None:
            authenticator = identity.authenticator if identity is not None and tokens is None else StaticTokens(tokens or {})
        self.authenticator = authenticator
        # With an identity service the stream is mTLS: tokens only bootstrap a node certificate,
        # hellos are authenticated by that certificate, and nodes send CSRs over the stream.
        self.identity = identity
        self.ping_interval = ping_interval
        self.connected: Counter[str] = Counter()  # node -> live authenticated connections
        self.pushes: Counter[str] = Counter()  # node -> configs sent
        self.bundle_pushes: Counter[str] = Counter()  # node -> trust bundles sent
        self.auth_failures = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def agents_connected(self) -> int:
        return sum(self.connected.values())

    async def start(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None) -> asyncio.AbstractServer:
        """Listens on host:port (0 = ephemeral). The one place the transport is made: pass `ssl`
        (a server SSLContext requiring client certs) to run the stream over mTLS."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(), self._accept), host, port, ssl=ssl,
        )
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(reader, writer, AGENT_MAX_FRAME)
        node = None
        try:
            hello = await asyncio.wait_for(conn.recv(), HELLO_TIMEOUT)
            if hello is None:
                return
            if hello.get("type") == "bootstrap" and self.identity is not None:
                await self._bootstrap(conn, hello, peer)
                return
            node, version = await self._authenticate(conn, hello, peer)
            if node is None:
                return
            self.connected[node] += 1
            log.info("agent %s connected from %s holding version %d", node, peer, version)
            await self._stream(conn, node, version)
        except asyncio.TimeoutError:
            log.warning("agent at %s sent no hello within %.0fs; closing", peer, HELLO_TIMEOUT)
        except ProtocolError as exc:
            log.warning("agent %s at %s broke the stream protocol: %s", node or "?", peer, exc)
        except (ConnectionError, OSError) as exc:
            log.info("agent %s at %s: connection lost: %s", node or "?", peer, exc)
        except Exception:
            log.exception("agent %s at %s: stream failed", node or "?", peer)
        finally:
            if node is not None and self.connected[node] > 0:
                self.connected[node] -= 1
                if not self.connected[node]:
                    del self.connected[node]
                log.info("agent %s at %s disconnected", node, peer)
            writer.close()

    async def _bootstrap(self, conn: _Conn, msg: dict[str, Any], peer: Any) -> None:
        assert self.identity is not None
        try:
            await conn.send(await self.identity.bootstrap(msg))
        except BootstrapRefused as exc:
            self.auth_failures += 1
            await conn.send({"type": "error", "reason": str(exc), "code": exc.reason})

    def _cert_node(self, conn: _Conn) -> str | None:
        assert self.identity is not None
        ssl_obj = conn.writer.get_extra_info("ssl_object")
        try:
            return self.identity.peer_node(ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None)
        except Exception as exc:  # IdentityError: a verified chain with a non-node identity
            log.warning("agent certificate is not a node identity: %s", exc)
            return None

    async def _authenticate(self, conn: _Conn, hello: dict[str, Any], peer: Any) -> tuple[str | None, int]:
        node, token, version = hello.get("node"), hello.get("token"), hello.get("version", 0)
        if self.identity is not None and hello.get("type") == "hello" and isinstance(node, str) \
                and isinstance(version, int) and not isinstance(version, bool):
            cert_node = self._cert_node(conn)
            if cert_node is None:
                reason = f"node {node!r} presented no node certificate: bootstrap with the node's token first, then connect with mTLS"
            elif cert_node != node:
                reason = f"certificate is for node {cert_node!r}, not {node!r}"
            else:
                return node, version
        elif hello.get("type") != "hello" or not isinstance(node, str) or not isinstance(token, str) \
                or not isinstance(version, int) or isinstance(version, bool):
            reason = "the first message must be {type: hello, node: str, token: str, version: int}"
        else:
            try:
                return await self.authenticator.authenticate(node, token), version
            except AgentAuthRefused as exc:
                reason = str(exc)
        self.auth_failures += 1
        log.warning("rejected agent at %s: %s", peer, reason)
        await conn.send({"type": "error", "reason": reason})
        return None, 0

    async def _stream(self, conn: _Conn, node: str, version: int) -> None:
        """Sends the node's config whenever its version differs from what the agent holds."""
        reader = asyncio.ensure_future(self._read_until_eof(conn, node))
        waiter: asyncio.Future[NodeConfig] | None = None
        # The trust bundle goes first (a reconnecting agent may have missed a change) and again
        # whenever it changes (root rotation), without waiting for the agent's next certificate.
        bundles = asyncio.ensure_future(self._push_bundles(conn, node)) if self.identity is not None else None
        try:
            while not reader.done():
                waiter = asyncio.ensure_future(self.store.wait_for_change(node, version))
                done, _ = await asyncio.wait({waiter, reader}, timeout=self.ping_interval, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    if not done:  # a quiet stream: ping so the agent knows we are alive
                        await conn.send({"type": "ping"})
                    continue
                cfg = waiter.result()
                await conn.send({"type": "config", "version": cfg.version, "config": cfg.to_dict()})
                self.pushes[node] += 1
                version = cfg.version
                log.debug("pushed version %d to %s", version, node)
            reader.result()  # re-raise what ended the read side
        finally:
            reader.cancel()
            if bundles is not None:
                bundles.cancel()
            if waiter is not None:
                waiter.cancel()

    async def _push_bundles(self, conn: _Conn, node: str) -> None:
        assert self.identity is not None
        sent = ""
        try:
            while True:
                sent = await self.identity.wait_bundle(sent)
                await conn.send({"type": "bundle", "bundle": sent})
                self.bundle_pushes[node] += 1
        except (ConnectionError, OSError) as exc:  # the read side notices too and ends the stream
            log.info("agent %s: trust bundle not delivered: %s", node, exc)

    async def _read_until_eof(self, conn: _Conn, node: str) -> None:
        """Reads pings; a peer silent for three ping intervals is gone (a half-open TCP connection)."""
        while True:
            try:
                msg = await asyncio.wait_for(conn.recv(), 3 * self.ping_interval)
            except asyncio.TimeoutError:
                log.warning("agent %s silent for %.0fs; closing its stream", node, 3 * self.ping_interval)
                return
            if msg is None:
                return
            if msg["type"] == "csr" and self.identity is not None:
                await conn.send(self.identity.sign(node, msg))
            elif msg["type"] not in ("ping",):
                log.debug("agent %s sent an unexpected %r message; ignored", node, msg["type"])
