"""The outbound listener (4140): accept → original destination → decide → connect → relay.

A pod's connect() was redirected here by connect4; the accepted socket's peer address is the pod's
own (ip, port), which the BPF lookup maps back to the address the pod dialed. `decide` turns that
into a Plan; this module only does the I/O the Plan asks for:
  local  – dial the pod directly;
  remote – dial the destination node's inbound port, send the tunnel request, wait for 200;
  reject – reset the client.
Client bytes that arrive while dialing are kept (reading paused past a bound) and sent first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import TYPE_CHECKING

from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.agent.balance import Balancer
from nodemesh.agent.decide import Plan, decide
from nodemesh.agent.handshake import HandshakeError, ResponseParser, TunnelResponse, encode_request
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.relay import Relay, reset_transport
from nodemesh.agent.workloads import NodeView
from nodemesh.authz import ClientInfo
from nodemesh.fastpath import TcpStats

if TYPE_CHECKING:
    from nodemesh.agent.http_proxy import HttpProxy

log = logging.getLogger(__name__)

PREBUFFER = 64 * 1024  # client bytes held while dialing before we stop reading the client
OriginalDst = Callable[[str, int], "tuple[str, int] | None"]


@dataclass(frozen=True)
class ListenerContext:
    """What a listener's connections need from the proxy; built once by NodeProxy."""

    view: Callable[[], NodeView]  # the current view (swapped atomically by apply_config)
    balancer: Balancer
    original_dst: OriginalDst  # BPF lookup by the accepted socket's peer (ip, port)
    metrics: ProxyMetrics
    connections: set[asyncio.BaseTransport]  # live accepted transports, closed by NodeProxy.stop
    connect_timeout: float = 5.0
    # mTLS tunnel pool (agent/tunnel.py TunnelPool). When set, remote plans only ever go through
    # it: no plaintext fallback across nodes.
    tunnels: Any = None
    authz: Authorizer | None = None  # None: no policy enforcement (tests of the bare data path)
    l7: HttpProxy | None = None  # None: L4 only (no protocol detection)
    # iptables mode: the original destination from the accepted socket itself (SO_ORIGINAL_DST,
    # agent/original_dst.py) instead of `original_dst`'s BPF lookup by peer address.
    original_dst_of_socket: Callable[[Any], "tuple[str, int] | None"] | None = None
    # Same-node kernel splice (agent/splice.py Splicer): local L4 plans are handed to the kernel
    # once relaying. None: always relayed in user space.
    splicer: Any = None


# ---- connect: dialing an upstream, shared with inbound.py ---------------------------------------


class DialError(Exception):
    """An upstream could not be reached. `error` is the metrics label, `status` the tunnel reply
    code the inbound side answers with."""

    def __init__(self, error: str, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.error = error
        self.status = status


class Upstream(asyncio.Protocol):
    """An upstream socket until the relay takes it: sends the tunnel request (remote), waits for the
    reply, and keeps whatever the upstream sends after it (server-first protocols speak first)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tunnel_request: bytes | None) -> None:
        self.ready: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.eof = False
        self.lost = False
        self.response: TunnelResponse | None = None
        self._request = tunnel_request
        self._parser = ResponseParser() if tunnel_request is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._request is not None:
            transport.write(self._request)  # type: ignore[attr-defined]
        else:
            self.ready.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self._parser is not None and self.response is None:
            try:
                parsed = self._parser.feed(data)
            except HandshakeError as exc:
                self._fail(DialError("handshake_error", f"bad tunnel reply: {exc}"))
                return
            if parsed is None:
                return
            self.response, data = parsed
            if not self.response.ok:
                self._fail(DialError("tunnel_refused", f"tunnel refused: {self.response.status} {self.response.reason}", self.response.status))
                return
            if not self.ready.done():
                self.ready.set_result(None)
        self.pending += data
        if len(self.pending) > PREBUFFER and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._fail(DialError("handshake_error", "upstream closed before answering the tunnel request"))
        return True  # keep the write side: a server may half-close and still read

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(DialError("connect_failed", f"upstream connection lost: {exc or 'closed'}"))


async def dial(addr: tuple[str, int], tunnel_request: bytes | None, timeout: float) -> tuple[asyncio.Transport, Upstream]:
    """Connect to `addr` (and complete the tunnel handshake when given); raise DialError."""
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, up = await loop.create_connection(lambda: Upstream(loop, tunnel_request), addr[0], addr[1])
            await up.ready
            return transport, up
    except TimeoutError:
        err = DialError("connect_timeout", f"no answer from {addr[0]}:{addr[1]} within {timeout:g}s", 504)
    except OSError as exc:
        err = DialError("connect_failed", f"cannot connect to {addr[0]}:{addr[1]}: {exc.strerror or exc}")
    except DialError as exc:
        err = exc
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    if transport is not None:
        reset_transport(transport)
    raise err


# ---- accept: one redirected client connection ---------------------------------------------------


class OutboundConnection(asyncio.Protocol):
    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.plan: Plan | None = None
        self.pending = bytearray()
        self.eof = False
        self._task: asyncio.Task[None] | None = None
        self._stats: TcpStats | None = None
        self.authz_subject: Subject | None = None  # set once authorized; re-checked on policy change
        self._detecting: asyncio.TimerHandle | None = None  # L7: waiting for the client's first bytes
        self.orig_dst: tuple[str, int] | None = None
        self.sni: str | None = None  # TLS ClientHello server name, when detection saw one (agent/detect.py)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        ctx.connections.add(transport)
        peer = transport.get_extra_info("peername")
        try:
            if ctx.original_dst_of_socket is not None:
                orig = ctx.original_dst_of_socket(transport.get_extra_info("socket"))
            else:
                orig = ctx.original_dst(peer[0], peer[1]) if peer else None
        except Exception:
            log.exception("original destination lookup failed for %s", peer)
            orig = None
        if orig is None:
            self._open_stats("", "")
            ctx.metrics.error("outbound", "no_original_dst")
            log.debug("no original destination for %s; closing", peer)
            reset_transport(transport)
            return
        self.plan = plan = decide(ctx.view(), peer[0], orig, ctx.balancer)
        self._open_stats(plan.labels.dst_namespace, plan.labels.dst_service)
        if plan.kind == "reject" and (ctx.l7 is None or not ctx.l7.wants_detection(plan, orig)):
            ctx.metrics.error("outbound", "no_route")
            log.info("outbound %s -> %s:%s rejected: %s", peer[0], orig[0], orig[1], plan.reason)
            reset_transport(transport)
            return
        # The one L7 hook: a service port whose clients may speak HTTP waits (briefly) for the first
        # bytes; agent/http_proxy.py takes HTTP/1 connections over (and authorizes each request
        # against the endpoint it picks), the rest goes on as L4 below.
        if ctx.l7 is not None and ctx.l7.wants_detection(plan, orig):
            self.orig_dst = orig  # the BPF lookup is not repeatable: keep it for the hand-over
            self._detecting = asyncio.get_running_loop().call_later(ctx.l7.detect_timeout, self._detected, True)
            return
        if not self._authorize_local(plan):
            return
        self._task = asyncio.get_running_loop().create_task(self._connect(plan))

    def _authorize_local(self, plan: Plan) -> bool:
        """Same node: the proxy is the target's inbound too, so it authorizes here, with the source
        pod's identity (from its IP on this node), before a byte reaches the pod. False: reset."""
        ctx = self.ctx
        if plan.kind != "local" or ctx.authz is None or plan.target is None:
            return True
        t = plan.target
        peer = self.transport.get_extra_info("peername")
        subject = Subject(ClientInfo(plan.src_identity, peer[0] if peer else ""), t.namespace, t.pod, t.ip, t.port)
        pod = ctx.view().local_pod(t.ip)
        if pod is not None:  # an HTTP port: route policies are decided per request (agent/inbound_http.py)
            from nodemesh.agent import inbound_http

            subject = inbound_http.gate(ctx, pod, t.port, subject)
        if not ctx.authz.check(subject).allowed:
            ctx.metrics.error("outbound", "unauthorized")
            reset_transport(self.transport)
            return False
        self.authz_subject = subject
        return True

    def _detected(self, timed_out: bool) -> None:
        assert self.ctx.l7 is not None and self.plan is not None and self._detecting is not None
        self._detecting.cancel()
        self._detecting = None
        if self.ctx.l7.take_over(self, timed_out):
            return
        if self.plan.kind == "reject":  # a service without endpoints, and not HTTP: no 503 to give
            self.ctx.metrics.error("outbound", "no_route")
            log.info("outbound to %s rejected: %s", self.plan.labels.authority, self.plan.reason)
            reset_transport(self.transport)
            return
        if not self._authorize_local(self.plan):  # L4 after all: the connection-level check
            return
        self._task = asyncio.get_running_loop().create_task(self._connect(self.plan))

    def _open_stats(self, ns: str, svc: str) -> None:
        self._stats = self.ctx.metrics.tcp("outbound", "src", ns, svc)
        self._stats.opened()

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) > PREBUFFER:
            self.transport.pause_reading()
        if self._detecting is not None and self.ctx.l7 is not None and self.ctx.l7.decided(self.pending):
            self._detected(False)

    def eof_received(self) -> bool:
        self.eof = True
        if self._detecting is not None:
            self._detected(False)
        return True  # the client may still want the response to what it sent

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached before the relay takes over (set_protocol moves later events to the relay).
        self.ctx.connections.discard(self.transport)
        if self._stats is not None:
            self._stats.closed()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._detecting is not None:
            self._detecting.cancel()

    async def _connect(self, plan: Plan) -> None:
        ctx = self.ctx
        assert plan.connect is not None
        try:
            try:
                request = encode_request(plan.tunnel) if plan.tunnel is not None else None
            except HandshakeError as exc:  # e.g. an identity the config got wrong: fail this one only
                raise DialError("handshake_error", f"cannot encode the tunnel request: {exc}") from None
            if plan.kind == "remote" and ctx.tunnels is not None:
                upstream, up = await ctx.tunnels.dial(plan, ctx.connect_timeout)
            else:
                upstream, up = await dial(plan.connect, request, ctx.connect_timeout)
        except DialError as exc:
            ctx.metrics.error("outbound", exc.error)
            log.info("outbound to %s via %s:%s failed: %s", plan.labels.authority, *plan.connect, exc)
            if not self.transport.is_closing():
                reset_transport(self.transport)
            return
        if self.transport.is_closing():  # the client left while we dialed
            upstream.close()
            return
        if up.lost:  # upstream went away between its reply and this task resuming
            ctx.metrics.error("outbound", "connect_failed")
            reset_transport(self.transport)
            return
        client = self.transport
        pod = ctx.view().local_pod(plan.target.ip) if plan.kind == "local" and plan.target is not None else None
        if pod is not None and self.authz_subject is not None and self._stats is not None:
            # Same node: this proxy is the pod's inbound, so an HTTP port is served per request here too.
            from nodemesh.agent import inbound_http

            pending, self.pending = bytes(self.pending), bytearray()

            def as_l4(data: bytes, eof: bool, subject: Subject) -> None:
                self.authz_subject = subject
                self.pending, self.eof = bytearray(data), eof
                self._relay(plan, upstream, up, client)

            if inbound_http.hand_over(ctx, client, pod, plan.target.port, self.authz_subject, self._stats, pending, self.eof, False, upstream, up, as_l4):
                return
            self.pending = bytearray(pending)
        self._relay(plan, upstream, up, client)

    def _relay(self, plan: Plan, upstream: asyncio.Transport, up: Upstream, client: asyncio.Transport) -> None:
        ctx = self.ctx
        tls = plan.kind == "remote" and ctx.tunnels is not None
        up_stats = ctx.metrics.tcp("outbound", "dst", plan.labels.dst_namespace, plan.labels.dst_service,
                                   tls=tls, server_id=plan.target.identity if tls and plan.target else "")
        up_stats.opened()
        splicer = ctx.splicer if plan.kind == "local" else None
        relay = (Relay if splicer is None else splicer.relay)(self._stats, up_stats, on_done=lambda: ctx.connections.discard(client), origin=self)
        relay.start(client, upstream, a_pending=bytes(self.pending), a_eof=self.eof, b_pending=bytes(up.pending), b_eof=up.eof)
        if splicer is not None:
            splicer.start(relay)
        self.pending = bytearray()
