"""HTTP/1.1 in the node proxy: one client connection the detector found speaking HTTP/1, served
request by request with per-request routing, balancing, retries, timeouts and circuit breaking.

    client ─ Http1Server (httptools + fastpath.Http1Reader: strict framing, head limit, deadline)
              └ per request: route (agent/routes.py) → backend service → L7Balancer (P2C + peak
                EWMA, breakers) → UpstreamPool (keep-alive connections per endpoint, dialed like L4:
                the pod directly or the remote node's inbound with the tunnel handshake) → response
                streamed back re-framed, hop-by-hop headers dropped.

Two drivers, same semantics. The common keep-alive case (a request without a body, on a route
without retries or timeouts) is `_Direct`: served from the protocol callbacks alone — parser →
route → P2C → pooled upstream → response head written with the first body bytes — with no task or
future per request (a task only when a new upstream connection must be dialed). Everything else
(request bodies, retries, timeouts, pipelined requests) is `Exchange`, a task per request.

Same-node endpoints are authorized per request with the source pod's identity (route policies
included: 403, the connection stays); a cross-node endpoint's node authorizes the tunnel stream
(and, on an HTTP port, each request on it: agent/inbound_http.py), and pooled cross-node
connections are keyed by source identity so one never carries another client's requests.

Bodies are streamed both ways with flow control; a request body is also kept (up to 64 KiB) only
when its route may retry it. A message the proxy refuses gets 400/408 and the connection closes with
nothing forwarded; errors the proxy answers itself carry `l5d-proxy-error: <reason>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools

from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.agent.decide import DstLabels, Plan, plan_for_endpoint
from nodemesh.agent.detect import DETECT_TIMEOUT, PortMemory, Protocol, classify, conclude, opaque_destinations
from nodemesh.agent.handshake import encode_request
from nodemesh.agent.http_metrics import HttpMetrics
from nodemesh.agent.l7_balance import AllEjected, EndpointState, L7Balancer, ep_key
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.outbound import DialError, OutboundConnection, dial
from nodemesh.agent.relay import reset_transport
from nodemesh.agent.retry_budget import MAX_RETRYABLE_BODY, RetryBudget
from nodemesh.agent.routes import EXTRA_KEY, Backend, RouteTable, Rule, compile_routes
from nodemesh.agent.workloads import NodeView, ServicePortTarget
from nodemesh.authz import ClientInfo
from nodemesh.fastpath import LAST_CHUNK, Head, Http1Error, Http1Reader, TcpStats, encode_chunk, encode_request_head, encode_response_head
from nodemesh.nodeconfig import Endpoint, NodeConfig

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # s to receive a whole request head once its first byte arrived (slowloris)
IDLE_TIMEOUT = 60.0  # s a keep-alive client connection may sit without a request
POOL_IDLE_MAX = 256  # idle upstream connections kept per endpoint (≥ the concurrency a node sees)
BUFFER_HIGH = 256 * 1024  # body bytes queued before the sender is paused
CORK_MAX_BODY = 64 * 1024  # see Http1Server.cork_until_close
ERROR_HEADER = b"l5d-proxy-error"

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 408: b"Request Timeout", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


class ProxyError(Exception):
    """The proxy answers the request itself with `status` and `reason` (also logged); h2 answers
    gRPC callers with the `grpc` status when one is given."""

    def __init__(self, status: int, reason: str, grpc: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.grpc = grpc


# ---- bodies: a bounded byte stream between a parser callback and the task that forwards it ----


class BodyStream:
    __slots__ = ("_chunks", "_size", "_done", "_waiter", "_pause", "_resume", "_paused", "error")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._pause, self._resume, self._paused = pause, resume, False
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BUFFER_HIGH and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self, error: Exception | None = None) -> None:
        self._done = True
        self.error = self.error or error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes | None:
        """Next chunk, or None at the end; raises the error the producer finished with."""
        while not self._chunks:
            if self._done:
                if self.error is not None:
                    raise self.error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._paused and self._size < BUFFER_HIGH // 4:
            self._paused = False
            self._resume()
        return data


class _WriteGate:
    """Lets a task wait while a transport's write buffer is over its high-water mark."""

    def __init__(self) -> None:
        self._ready: asyncio.Future[None] | None = None

    def pause(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        self._ready = None

    async def wait(self) -> None:
        if self._ready is not None:
            await self._ready


# ---- upstream: one keep-alive connection to an endpoint ------------------------------------------


class UpstreamConn(asyncio.Protocol):
    def __init__(self, key: tuple, stats: TcpStats) -> None:
        self.key = key
        self.stats = stats
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = Http1Reader(self, False)
        self.parser = httptools.HttpResponseParser(self.reader)
        self.reader.parser = self.parser
        self.head: asyncio.Future[Head] | None = None
        self.body: BodyStream | None = None
        self.lost = False
        self.reusable = False
        self.head_request = False
        self.gate = _WriteGate()
        self.direct: _Direct | None = None  # callback mode: the response goes to it, no futures

    def take(self, transport: asyncio.Transport, pending: bytes) -> None:
        self.transport = transport
        transport.set_protocol(self)
        if pending:  # an upstream must not speak first; whatever it sent makes it unusable
            self._broken(ProxyError(502, "upstream sent bytes before a request"))

    def start(self, head_request: bool) -> asyncio.Future[Head]:
        loop = asyncio.get_running_loop()
        self.head = loop.create_future()
        self.body = BodyStream(self.transport.pause_reading, self.transport.resume_reading)
        self.head_request = head_request
        self.reusable = False
        return self.head

    def start_direct(self, sink: _Direct, head_request: bool) -> None:
        """Callback mode (the common keep-alive case): the response head, body and end are handed
        to `sink` from the parser callbacks, with no future or stream in between."""
        self.direct = sink
        self.head_request = head_request
        self.reusable = False

    def write(self, data: bytes) -> None:
        self.stats.add_write(len(data))
        self.transport.write(data)

    # parser sink
    def on_head(self, head: Head) -> None:
        if head.status < 200 and head.status != 101:  # 1xx interim: wait for the real one
            return
        if self.direct is not None:
            self.direct.resp_head(head)
        elif self.head is not None and not self.head.done():
            self.head.set_result(head)
        if self.head_request or head.status in (204, 304):
            self._end(head.keep_alive)
            self.parser = httptools.HttpResponseParser(self.reader)  # no body follows, whatever the head says
            self.reader.parser = self.parser

    def on_body(self, body: bytes) -> None:
        if self.direct is not None:
            self.direct.resp_body(body)
        elif self.body is not None:
            self.body.feed(body)

    def on_end(self) -> None:
        if self.head_request:
            return
        if self.direct is not None and self.direct.resp is not None or self.head is not None and self.head.done():
            self._end(self.parser.should_keep_alive())

    def _end(self, keep_alive: bool) -> None:
        self.reusable = keep_alive and not self.lost
        if self.body is not None:
            self.body.finish()
        d = self.direct
        if d is not None:
            self.direct = None
            d.resp_end(self)

    # protocol
    def data_received(self, data: bytes) -> None:
        self.stats.add_read(len(data))
        if self.head is None and self.direct is None:
            self._broken(ProxyError(502, "upstream sent bytes without a request"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(ProxyError(502, "upstream switched protocols, which the proxy does not relay"))
        except httptools.HttpParserError as exc:
            self._broken(ProxyError(502, f"malformed response from upstream: {exc}"))
            return
        if self.reader.error is not None:
            self._broken(ProxyError(502, f"refused response from upstream: {self.reader.error.reason}"))

    def eof_received(self) -> bool:
        # A response without Content-Length or chunked framing ends at EOF (llhttp needs no finish
        # call we could make through httptools, so end it here).
        h = self.direct.resp if self.direct is not None else self.head.result() if self.head is not None and self.head.done() else None
        if self.reader.in_message and self.reader.head_done and h is not None:
            if h.content_length is None and not h.chunked:
                self.lost = True
                self._end(False)
                return False
        self._broken(ProxyError(502, "upstream closed the connection before a complete response"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self._broken(ProxyError(502, f"upstream connection lost: {exc or 'closed'}"))
        self.stats.closed()

    def pause_writing(self) -> None:
        self.gate.pause()

    def resume_writing(self) -> None:
        self.gate.resume()

    def _broken(self, err: ProxyError) -> None:
        self.lost = True
        self.reusable = False
        if self.head is not None and not self.head.done():
            self.head.set_exception(err)
        if self.body is not None:
            self.body.finish(err)
        d = self.direct
        if d is not None:
            self.direct = None
            d.upstream_failed(self, err)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per endpoint (LIFO: the warmest first)."""

    def __init__(self, metrics: ProxyMetrics, connect_timeout: float) -> None:
        self._idle: dict[tuple, list[UpstreamConn]] = {}
        self._metrics = metrics
        self._timeout = connect_timeout
        self._all: set[UpstreamConn] = set()
        self.tunnels: Any = None  # outbound.ListenerContext.tunnels, set at the first hand-over

    @staticmethod
    def key(plan: Plan) -> tuple:
        assert plan.target is not None
        # A cross-node connection carries the source's identity (the mTLS client certificate, or the
        # plaintext tunnel's claim) and the destination authorized *that* identity: it must never
        # carry another client's requests. Same-node ones are authorized per request (Exchange).
        return (ep_key(plan.target), plan.src_identity) if plan.kind == "remote" else ep_key(plan.target)

    def take_idle(self, key: tuple) -> UpstreamConn | None:
        """A pooled connection for `key` (UpstreamPool.key), or None: then `acquire` dials."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost and not conn.transport.is_closing():
                return conn
        return None

    async def acquire(self, plan: Plan) -> UpstreamConn:
        assert plan.target is not None and plan.connect is not None
        key = self.key(plan)
        conn = self.take_idle(key)
        if conn is not None:
            return conn
        tls = plan.kind == "remote" and self.tunnels is not None
        if tls:  # cross-node: the same mTLS tunnel the L4 path uses (issue 4)
            transport, up = await self.tunnels.dial(plan, self._timeout)
        else:
            request = encode_request(plan.tunnel) if plan.tunnel is not None else None
            transport, up = await dial(plan.connect, request, self._timeout)
        stats = self._metrics.tcp("outbound", "dst", plan.labels.dst_namespace, plan.labels.dst_service,
                                  tls=tls, server_id=plan.target.identity if tls else "")
        stats.opened()
        conn = UpstreamConn(key, stats)
        conn.take(transport, bytes(up.pending))
        if up.lost or up.eof:
            conn.lost = True
            raise DialError("connect_failed", "upstream closed right after connecting")
        self._all.add(conn)
        transport.get_protocol()  # noqa: B018 (set_protocol took effect)
        return conn

    def release(self, conn: UpstreamConn) -> None:
        if conn.reusable and not conn.lost and not conn.transport.is_closing():
            conn.head = None
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < POOL_IDLE_MAX:
                idle.append(conn)
                return
        self.discard(conn)

    def discard(self, conn: UpstreamConn) -> None:
        self._all.discard(conn)
        if conn.transport is not None and not conn.transport.is_closing():
            conn.lost = True
            conn.transport.close()

    def close(self) -> None:
        for conn in list(self._all):
            conn.lost = True
            if conn.transport is not None:
                conn.transport.abort()
        self._all.clear()
        self._idle.clear()


# ---- the shared L7 state of one node proxy ------------------------------------------------------


class HttpProxy:
    """What every HTTP connection of one NodeProxy shares: pool, balancer, budgets, routes, metrics."""

    def __init__(self, metrics: ProxyMetrics, connect_timeout: float = 5.0, header_timeout: float = HEADER_TIMEOUT,
                 detect_timeout: float = DETECT_TIMEOUT) -> None:
        self.metrics = metrics
        self.detect_timeout = detect_timeout
        self.memory = PortMemory()
        self._opaque: frozenset[tuple[str, int]] = frozenset()
        self.http_metrics = HttpMetrics(metrics.registry)
        self.pool = UpstreamPool(metrics, connect_timeout)
        self.balancer = L7Balancer()
        self.header_timeout = header_timeout
        self._budgets: dict[str, RetryBudget] = {}
        self._routes = RouteTable()

    @property
    def routes(self) -> RouteTable:
        return self._routes

    def apply_config(self, cfg: NodeConfig) -> None:
        """Compile the config's HTTPRoutes and forget endpoints that left it."""
        self._routes = compile_routes(cfg.extra.get(EXTRA_KEY) or [])
        self._opaque = opaque_destinations(cfg)
        self.balancer.retain(e for s in cfg.services for p in s.ports for e in p.endpoints)

    # ---- detection, called from outbound.OutboundConnection (the one hook) ----

    def wants_detection(self, plan: Plan, orig: tuple[str, int]) -> bool:
        """Service ports only (a pod dialed directly stays L4), unless marked or remembered opaque."""
        return bool(plan.labels.dst_service) and orig not in self._opaque and not self.memory.is_opaque(orig)

    @staticmethod
    def decided(pending: bytearray) -> bool:
        return classify(bytes(pending[:64])) is not None

    def take_over(self, conn: OutboundConnection, timed_out: bool) -> bool:
        """Conclude detection for `conn`; True when it is now served as HTTP/1 here."""
        peer = conn.transport.get_extra_info("peername")
        orig = conn.orig_dst
        self.pool.tunnels = getattr(conn.ctx, "tunnels", None)
        found = conclude(bytes(conn.pending[:16384]), timed_out)
        if orig is not None:
            self.memory.record(orig, found)
        h2 = getattr(self, "h2", None)  # agent/h2_proxy.H2Proxy, attached by NodeProxy
        if found.protocol is Protocol.HTTP2 and h2 is not None and not conn.transport.is_closing():
            return h2.take_over(conn)
        if found.protocol is Protocol.TLS:
            # TLS from the app itself is relayed opaque; the server name is kept for logs and tap.
            conn.sni = found.sni
            log.debug("outbound to %s:%s: TLS from the client (SNI %s), relayed as opaque TCP", *(orig or ("?", 0)), found.sni or "none")
        if found.protocol is not Protocol.HTTP1 or conn.transport.is_closing():
            if found.timed_out:
                log.info("outbound to %s:%s: client silent for %gs, treating the port as server-speaks-first", *(orig or ("?", 0)), self.detect_timeout)
            return False
        view = conn.ctx.view()
        target = view.service_port(*orig) if orig is not None else None
        if target is None or conn._stats is None:
            return False
        server = Http1Server(self, http_target(view, target, peer[0], conn.ctx.authz), conn._stats, conn.ctx.connections)
        pending, conn.pending = bytes(conn.pending), bytearray()
        server.take(conn.transport, pending, conn.eof)
        return True

    def budget(self, route: str) -> RetryBudget:
        b = self._budgets.get(route)
        if b is None:
            b = self._budgets[route] = RetryBudget()
        return b

    def close(self) -> None:
        self.pool.close()


@dataclass(frozen=True)
class HttpTarget:
    """What the client dialed: a service port, resolved once per connection."""

    view: NodeView
    target: ServicePortTarget
    source_ip: str
    src_identity: str | None
    authz: Authorizer | None = None  # None: no policy enforcement (tests of the bare data path)


# ---- the client side ---------------------------------------------------------------------------


class _Request:
    __slots__ = ("head", "body", "started")

    def __init__(self, head: Head, body: BodyStream) -> None:
        self.head = head
        self.body = body
        self.started = time.monotonic()


class Http1Server(asyncio.Protocol):
    """One client connection after detection said HTTP/1. Requests are served one at a time, in
    order (pipelined requests wait, their bodies bounded by flow control)."""

    def __init__(self, proxy: HttpProxy, target: HttpTarget, stats: TcpStats, connections: set[asyncio.BaseTransport]) -> None:
        self.proxy = proxy
        self.target = target
        self.stats = stats
        self.connections = connections
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = Http1Reader(self, True)
        self.parser = httptools.HttpRequestParser(self.reader)
        self.reader.parser = self.parser
        self.queue: deque[_Request] = deque()
        self.current: _Request | None = None
        self.closed = False
        self.eof = False
        self.gate = _WriteGate()
        self._wake: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None  # armed deadline (loop time); the handle may fire earlier
        self._task: asyncio.Task[None] | None = None
        self._parsing: _Request | None = None
        # The in-flight request's authorization against a same-node pod: Authorizer.revalidate cuts
        # the connection when a policy change no longer allows it (None between requests).
        self.authz_subject: Subject | None = None
        self._direct: _Direct | None = None  # the request served from callbacks, if any
        self._refused = b""  # the error answer owed after the in-flight request (a refused one followed)
        self._dst = self._dst_stats()

    def _dst_stats(self) -> Any:
        """The request_total/response_total series of this connection (agent/inbound_http.py's
        server overrides it with inbound labels)."""
        svc, port = self.target.target.service, self.target.target.port
        return self.proxy.http_metrics.dst("outbound", f"{svc.authority}:{port.port}", svc.namespace, svc.name)

    # handed over from outbound.OutboundConnection
    def take(self, transport: asyncio.Transport, pending: bytes, eof: bool) -> None:
        self.transport = transport
        transport.set_protocol(self)
        transport.resume_reading()  # the detector may have paused it past its prebuffer
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._serve())
        self._arm(self.proxy.header_timeout)
        if pending:
            self.data_received(pending)
        if eof:
            self.eof_received()

    def _arm(self, timeout: float) -> None:
        # One timer handle, moved only when the new deadline is earlier: a keep-alive connection
        # re-arms twice per request, and cancelling/scheduling timers each time costs.
        loop = asyncio.get_running_loop()
        at = self._deadline_at = loop.time() + timeout
        h = self._deadline
        if h is None or h.when() > at:
            if h is not None:
                h.cancel()
            self._deadline = loop.call_at(at, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        at = self._deadline_at
        if at is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < at:  # re-armed later since this handle was scheduled
            self._deadline = loop.call_at(at, self._on_deadline)
            return
        self._deadline_at = None
        if self.closed or self.current is not None or self.queue or self._direct is not None:
            return
        if self.reader.in_message:
            log.info("outbound http %s: request head not complete within %gs; 408", self.target.source_ip, self.proxy.header_timeout)
            self._refuse(408, "request head not received in time")
        else:
            self._close()  # idle keep-alive connection

    # parser sink
    def on_head(self, head: Head) -> None:
        self._deadline_at = None  # disarmed (the handle, if any, finds nothing to do)
        self._dst.request()
        if self.current is None and self._direct is None and not self.queue and not self.closed and self._start_direct(head):
            return
        req = _Request(head, BodyStream(self.transport.pause_reading, self.transport.resume_reading))
        self._parsing = req
        self.queue.append(req)
        if self._direct is None and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _start_direct(self, head: Head) -> bool:
        """The common case is served from callbacks (no task, no future): a request without a body,
        on a route without retries or timeouts. False: the task-driven Exchange serves it."""
        if head.chunked or head.content_length:
            return False
        svc, port = self.target.target.service, self.target.target.port
        routes = self.proxy.routes
        rule = None
        if routes.rules_for(svc.namespace, svc.name, port.port):
            path = head.url.split(b"?", 1)[0].decode("latin-1")
            rule = routes.match(svc.namespace, svc.name, port.port, head.method, path, {n.lower(): v for n, v in head.headers})
            if rule is not None and (rule.retry is not None or rule.timeout is not None or rule.backend_timeout is not None):
                return False
        self._direct = d = _Direct(self, head, rule)
        d.start()
        return True

    def _direct_done(self, keep: bool) -> None:
        self._direct = None
        self.authz_subject = None
        if self.closed:
            return
        if self._refused:  # a malformed request followed: its 400, then close
            self._write(self._refused)
            self._close()
        elif not keep:
            self._close()
        elif self.queue:  # pipelined behind it: the task serves those
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
        elif self.eof:
            self._close()
        else:
            self._arm(IDLE_TIMEOUT)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.feed(body)

    def on_end(self) -> None:
        if self._parsing is not None:
            self._parsing.body.finish()
            self._parsing = None

    # protocol
    def data_received(self, data: bytes) -> None:
        self.stats.add_read(len(data))
        if self.closed:
            return
        if not self.reader.in_message and self.current is None and self._direct is None and not self.queue and self._deadline_at is not None:
            self._arm(self.proxy.header_timeout)  # first byte of a new request: the head deadline starts
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrade is not supported by the proxy")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")
            return
        if self.reader.error is not None:
            err: Http1Error = self.reader.error
            self._refuse(err.status, err.reason)

    def eof_received(self) -> bool:
        self.eof = True
        if self._parsing is not None:
            self._parsing.body.finish(ProxyError(400, "client closed mid-request"))
            self._parsing = None
        if self.current is None and self._direct is None and not self.queue:
            self._close()
            return False
        return True  # answer what is in flight, then close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
        self.connections.discard(self.transport)
        self.stats.closed()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._parsing is not None:
            self._parsing.body.finish(ProxyError(400, "client connection lost"))
        if self._direct is not None:
            self._direct.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self.gate.pause()
        d = self._direct
        if d is not None and d.conn is not None:
            d.paused = True
            d.conn.transport.pause_reading()  # the response waits upstream (flow control)

    def resume_writing(self) -> None:
        self.gate.resume()
        d = self._direct
        if d is not None and d.conn is not None and d.paused:
            d.paused = False
            if not d.conn.transport.is_closing():
                d.conn.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        self.stats.add_write(len(data))
        self.transport.write(data)

    def cork_until_close(self, content_length: int | None) -> None:
        """A response after which this connection closes: hold its tail (TCP_CORK) so the FIN
        leaves in the same segment as the last bytes. Otherwise a client that closes as soon as
        it has the body (wrk, most HTTP/1.0 clients) closes first and keeps the TIME_WAIT, and its
        ephemeral ports towards the proxy's few listener ports run out (measured: new
        connections/s fell from 3.8k to 0.3k within 10 s). Only for a small known length: a
        long or streamed body must not wait on the cork (up to 200 ms per partial segment)."""
        if content_length is None or content_length > CORK_MAX_BODY:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a refused message and close: nothing of it went upstream (smuggling defence)."""
        log.info("outbound http from %s refused with %d: %s", self.target.source_ip, status, reason)
        if self.current is None and self._direct is None:
            self._write(_error_response(status, reason, close=True))
            self._close()
        elif self._direct is not None and not self._refused:  # answered after the request in flight
            self._refused = _error_response(status, reason, close=True)
            self.transport.pause_reading()
        else:  # a response is streaming: the refused request behind it just ends the connection
            reset_transport(self.transport)
            self.closed = True
        if self._parsing is not None:
            self._parsing.body.finish(ProxyError(status, reason))

    def _close(self) -> None:
        self.closed = True
        if not self.transport.is_closing():
            self.transport.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                if not self.queue:
                    if self.eof:
                        break
                    self._wake = loop.create_future()
                    await self._wake
                    self._wake = None
                    continue
                self.current = req = self.queue.popleft()
                keep = await self._exchange(req)
                self.current = None
                if not keep or self.closed:
                    break
                if not self.queue:
                    self._arm(IDLE_TIMEOUT)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("outbound http connection from %s failed", self.target.source_ip)
            reset_transport(self.transport)
            return
        if not self.transport.is_closing():
            self._close()

    async def _exchange(self, req: _Request) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        handler = Exchange(self.proxy, self.target, req, self)
        return await handler.run()


def _error_response(status: int, reason: str, close: bool) -> bytes:
    return encode_response_head(status, _REASONS.get(status, b"Error"), [(ERROR_HEADER, reason.encode("latin-1", "replace"))], 0, False, close)


class Exchange:
    """One request through route → backend → endpoint → upstream, with retries and a timeout."""

    def __init__(self, proxy: HttpProxy, target: HttpTarget, req: _Request, server: Http1Server) -> None:
        self.proxy = proxy
        self.t = target
        self.req = req
        self.server = server
        self.head_sent = False
        self._settled = False
        self._rtt_from = 0.0  # when this attempt's request went out on a ready connection (see _settle)
        self._may_retry: Callable[[], bool] | None = None
        self._prefix: list[bytes] | None = None
        self._route: str | None = None  # the matched HTTPRoute ("<namespace>/<name>"), for authorization

    async def run(self) -> bool:
        t, req, head = self.t, self.req, self.req.head
        svc, port = t.target.service, t.target.port
        path = head.url.split(b"?", 1)[0].decode("latin-1")
        hdrs = {n.lower(): v for n, v in head.headers}
        rule = self.proxy.routes.match(svc.namespace, svc.name, port.port, head.method, path, hdrs)
        route_name = rule.route if rule is not None else "default"
        self._route = rule.route if rule is not None else None
        dst_stats = self.proxy.http_metrics.dst("outbound", f"{svc.authority}:{port.port}", svc.namespace, svc.name)
        route_stats = self.proxy.http_metrics.route("outbound", route_name, svc.namespace, svc.name)
        route_stats.request()
        keep = head.keep_alive and not self.server.eof
        status = 0
        try:
            timeout = rule.timeout if rule is not None else None
            async with asyncio.timeout(timeout):
                status, keep_up = await self._attempts(rule, route_name, dst_stats, route_stats)
            keep = keep and keep_up
        except TimeoutError:
            status = 504
            reason = f"request timed out after {timeout:g}s (route {route_name})"
            keep = self._answer(504, reason, keep)
        except ProxyError as exc:
            status = exc.status
            keep = self._answer(exc.status, exc.reason, keep and exc.status != 400)
        finally:
            self.server.authz_subject = None
        latency = (time.monotonic() - req.started) * 1000
        failure = status >= 500 or status == 0
        dst_stats.response(status, failure, latency)
        route_stats.response(status, failure, latency)
        return keep

    def _answer(self, status: int, reason: str, keep: bool) -> bool:
        if self.head_sent:  # too late for a status: cut the response short so the client sees it
            log.info("outbound http %s: response cut short: %s", self.t.source_ip, reason)
            reset_transport(self.server.transport)
            return False
        log.info("outbound http %s %s%s -> %d: %s", self.t.source_ip, self.req.head.method.decode(), self.req.head.url.decode("latin-1")[:200], status, reason)
        if not self.server.transport.is_closing():
            self.server._write(_error_response(status, reason, close=not keep))
        if not keep or not self.req.body._done:
            return False  # an unread request body would be taken for the next request
        return keep

    def _backend_target(self, backend: Backend | None) -> ServicePortTarget:
        return backend_target(self.t, backend)

    async def _attempts(self, rule: Rule | None, route_name: str, dst_stats, route_stats) -> tuple[int, bool]:  # noqa: ANN001
        head = self.req.head
        retry = rule.retry if rule is not None else None
        budget = self.proxy.budget(route_name) if retry is not None else None
        body_kept: list[bytes] | None = None
        if retry is not None and (head.content_length is None or head.content_length <= MAX_RETRYABLE_BODY):
            body_kept = await self._read_small_body()  # None: bigger than 64 KiB, not retryable
        if budget is not None:
            budget.deposit()
        attempt = 0
        while True:
            backend = rule.pick_backend() if rule is not None and rule.backends else None
            tgt = self._backend_target(backend)
            final = retry is None or body_kept is None or attempt >= retry.attempts
            self._may_retry = budget.withdraw if budget is not None else None
            status, keep = await self._one(tgt, body_kept, retry.codes if retry is not None and not final else frozenset(),
                                           rule.backend_timeout if rule is not None else None)
            if status >= 0:
                return status, keep
            # the response was retryable, the budget had room, and the response was discarded
            attempt += 1
            dst_stats.retry()
            route_stats.retry()

    async def _read_small_body(self) -> list[bytes] | None:
        # Only called when the length is known ≤ 64 KiB or chunked; a chunked body that grows past
        # the limit is still sent, just never retried.
        chunks: list[bytes] = []
        size = 0
        while True:
            c = await self.req.body.read()
            if c is None:
                return chunks
            chunks.append(c)
            size += len(c)
            if size > MAX_RETRYABLE_BODY:
                self._prefix = chunks
                return None

    async def _one(self, tgt: ServicePortTarget, body: list[bytes] | None, retry_codes: frozenset[int],
                   attempt_timeout: float | None) -> tuple[int, bool]:
        """One attempt. Returns (status, upstream reusable) after streaming the response, or
        (-1, _) when the response had a retryable status and was discarded."""
        t = self.t
        usable = [e for e in tgt.port.endpoints if e.node == t.view.node or t.view.node_info(e.node) is not None]
        if not usable:
            raise ProxyError(503, f"no endpoints for service {tgt.service.namespace}/{tgt.service.name} port {tgt.port.port}")
        try:
            ep, st = self.proxy.balancer.pick(usable)
        except AllEjected as exc:
            raise ProxyError(503, f"{exc} for service {tgt.service.namespace}/{tgt.service.name}") from None
        labels = DstLabels(tgt.service.namespace, tgt.service.name, ep.pod, f"{tgt.service.authority}:{tgt.port.port}")
        plan = plan_for_endpoint(t.view, ep, labels, t.src_identity)
        if plan.kind == "local" and t.authz is not None:
            self._authorize(ep)
        started = time.monotonic()
        self._settled = False
        self._rtt_from = started
        try:
            async with asyncio.timeout(attempt_timeout):
                return await self._send(plan, ep, st, body, retry_codes, started)
        except TimeoutError:
            self._settle(st, started, failed=True)
            raise ProxyError(504, f"backend request timed out after {attempt_timeout:g}s") from None
        except asyncio.CancelledError:  # the route's timeout: the endpoint was too slow
            self._settle(st, started, failed=True)
            raise

    def _authorize(self, ep: Endpoint) -> None:
        self.server.authz_subject = _authorize(self.t, ep, self._route)

    def _settle(self, st: EndpointState, started: float, failed: bool) -> None:
        if self._settled:
            return
        self._settled = True
        _settle(st, max(started, self._rtt_from), failed)

    async def _send(self, plan: Plan, ep: Endpoint, st: EndpointState, body: list[bytes] | None,
                    retry_codes: frozenset[int], started: float) -> tuple[int, bool]:
        head = self.req.head
        pool = self.proxy.pool
        try:
            conn = await pool.acquire(plan)
        except DialError as exc:
            denied = exc.status == 403  # the endpoint's node refused this client: not the endpoint's failure
            self._settle(st, started, failed=not denied)
            self.proxy.metrics.error("outbound", exc.error)
            raise ProxyError(exc.status if exc.status in (403, 502, 504) else 502, f"endpoint {ep.namespace}/{ep.pod}: {exc}") from None
        self._rtt_from = time.monotonic()  # see _settle: the endpoint's latency starts on a ready connection
        ok = False
        try:
            head_fut = conn.start(head.method == b"HEAD")
            if body is not None:
                size = sum(len(c) for c in body)
                conn.write(encode_request_head(head.method, head.url, head.headers, size if (size or head.content_length is not None or head.chunked) else None, False) + b"".join(body))
            else:
                await self._stream_request(conn)
            resp = await head_fut
            if resp.status in retry_codes and self._may_retry is not None and self._may_retry():
                # discard the failed response (drain to keep the connection when it is small)
                self._settle(st, started, failed=resp.status >= 500)
                assert conn.body is not None
                while await conn.body.read() is not None:
                    pass
                ok = True
                return -1, True
            self._settle(st, started, failed=resp.status >= 500)
            await self._stream_response(conn, resp)
            ok = True
            return resp.status, True
        except ProxyError as exc:
            self._settle(st, started, failed=True)
            raise ProxyError(exc.status, f"endpoint {ep.namespace}/{ep.pod}: {exc.reason}") from None
        finally:
            if ok:
                pool.release(conn)
            else:
                pool.discard(conn)

    async def _stream_request(self, conn: UpstreamConn) -> None:
        head, body = self.req.head, self.req.body
        prefix = self._prefix
        known = head.content_length
        chunked = known is None and (head.chunked or prefix is not None)
        conn.write(encode_request_head(head.method, head.url, head.headers, known, chunked))
        if known == 0 or (known is None and not head.chunked):
            return
        for c in prefix or ():
            conn.write(encode_chunk(c) if chunked else c)
        while True:
            c = await body.read()
            if c is None:
                break
            conn.write(encode_chunk(c) if chunked else c)
            await conn.gate.wait()
        if chunked:
            conn.write(LAST_CHUNK)

    async def _stream_response(self, conn: UpstreamConn, resp: Head) -> None:
        server = self.server
        no_body = self.req.head.method == b"HEAD" or resp.status in (204, 304)
        chunked = not no_body and resp.content_length is None
        close = not self.req.head.keep_alive or server.eof
        if close:
            server.cork_until_close(0 if no_body else resp.content_length)
        server._write(encode_response_head(resp.status, resp.reason, resp.headers, resp.content_length, chunked, close))
        self.head_sent = True
        assert conn.body is not None
        while True:
            c = await conn.body.read()
            if c is None:
                break
            if c:
                server._write(encode_chunk(c) if chunked else c)
                await server.gate.wait()
        if chunked:
            server._write(LAST_CHUNK)


def backend_target(t: HttpTarget, backend: Backend | None) -> ServicePortTarget:
    """The service port a route's backendRef names (the dialed one when the rule has none); 503 if absent."""
    if backend is None:
        return t.target
    for tgt in t.view.service_ports.values():
        s = tgt.service
        if (s.namespace, s.name, tgt.port.port) == (backend.namespace, backend.name, backend.port):
            return tgt
    raise ProxyError(503, f"backend service {backend.namespace}/{backend.name}:{backend.port} is not in the config")


def _authorize(t: HttpTarget, ep: Endpoint, route: str | None) -> Subject:
    """A same-node pod: this proxy is its inbound, so each request is authorized here with the
    source pod's identity, route policies included; denied → ProxyError 403 (the connection stays).
    A cross-node endpoint's node authorizes the tunnel stream, which carries only this source."""
    assert t.authz is not None
    if route is not None:  # route policies name an HTTPRoute of the pod's namespace
        ns, _, name = route.partition("/")
        route = name if ns == ep.namespace else route
    subject = Subject(ClientInfo(t.src_identity, t.source_ip), ep.namespace, ep.pod, ep.ip, ep.port, route)
    d = t.authz.check_http(subject, route)
    if not d.allowed:
        raise ProxyError(403, d.reason)
    return subject


def _settle(st: EndpointState, started: float, failed: bool) -> None:
    """Feed the balancer the endpoint's latency and the breaker its verdict. Callers pass the time
    the request went out on a ready connection (as tower's PeakEwma measures it): a connect or an
    mTLS tunnel handshake is not the endpoint's latency, and with a 10 s decay one slow first dial
    would keep an endpoint looking slow for seconds."""
    now = time.monotonic()
    st.load.finish((now - started) * 1000, now)
    if failed:
        st.breaker.failure()
    else:
        st.breaker.success()


class _Direct:
    """One request served from protocol callbacks: route → backend → endpoint (P2C) → pooled
    upstream; the response head is encoded when it arrives and written with the first body bytes.
    Only a dial (no idle pooled connection) runs a task. Semantics match Exchange's for a
    body-less request on a route without retries or timeouts."""

    __slots__ = ("server", "head", "rule", "route", "rstats", "started", "st", "ep", "t0", "conn", "resp", "chunked", "close",
                 "pending", "paused", "task", "done")

    def __init__(self, server: Http1Server, head: Head, rule: Rule | None) -> None:
        self.server = server
        self.head = head
        self.rule = rule
        self.route = rule.route if rule is not None else None
        svc = server.target.target.service
        self.rstats = server.proxy.http_metrics.route("outbound", self.route or "default", svc.namespace, svc.name)
        self.rstats.request()
        self.started = time.monotonic()
        self.st: EndpointState | None = None
        self.ep: Endpoint | None = None
        self.t0 = 0.0
        self.conn: UpstreamConn | None = None
        self.resp: Head | None = None
        self.chunked = False
        self.close = False
        self.pending: bytes | None = None  # the response head, written with the first body bytes
        self.paused = False
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        server, rule = self.server, self.rule
        t = server.target
        proxy = server.proxy
        try:
            tgt = backend_target(t, rule.pick_backend() if rule is not None and rule.backends else None)
            usable = [e for e in tgt.port.endpoints if e.node == t.view.node or t.view.node_info(e.node) is not None]
            if not usable:
                raise ProxyError(503, f"no endpoints for service {tgt.service.namespace}/{tgt.service.name} port {tgt.port.port}")
            try:
                ep, st = proxy.balancer.pick(usable)
            except AllEjected as exc:
                raise ProxyError(503, f"{exc} for service {tgt.service.namespace}/{tgt.service.name}") from None
            self.ep, self.st, self.t0 = ep, st, time.monotonic()
            plan = plan_for_endpoint(t.view, ep, DstLabels(tgt.service.namespace, tgt.service.name, ep.pod, f"{tgt.service.authority}:{tgt.port.port}"), t.src_identity)
            if plan.kind == "local" and t.authz is not None:
                server.authz_subject = _authorize(t, ep, self.route)
        except ProxyError as exc:
            if self.st is not None:  # denied after the pick: not the endpoint's failure
                _settle(self.st, self.t0, failed=False)
            self._answer(exc.status, exc.reason)
            return
        conn = proxy.pool.take_idle(UpstreamPool.key(plan))
        if conn is None:
            self.task = asyncio.get_running_loop().create_task(self._dial(plan))
        else:
            self._send(conn)

    async def _dial(self, plan: Plan) -> None:
        server, ep, st = self.server, self.ep, self.st
        assert ep is not None and st is not None
        try:
            conn = await server.proxy.pool.acquire(plan)
        except DialError as exc:
            denied = exc.status == 403  # the endpoint's node refused this client: not the endpoint's failure
            _settle(st, self.t0, failed=not denied)
            server.proxy.metrics.error("outbound", exc.error)
            self._answer(exc.status if exc.status in (403, 502, 504) else 502, f"endpoint {ep.namespace}/{ep.pod}: {exc}")
            return
        self.t0 = time.monotonic()  # see _settle: the endpoint's latency starts on a ready connection
        if self.done:  # the client left while dialing: keep the fresh connection for the next one
            conn.reusable = True
            server.proxy.pool.release(conn)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConn) -> None:
        self.conn = conn
        head = self.head
        conn.start_direct(self, head.method == b"HEAD")
        conn.write(encode_request_head(head.method, head.url, head.headers, head.content_length, False))

    # ---- from UpstreamConn's parser callbacks ----

    def resp_head(self, resp: Head) -> None:
        assert self.st is not None
        self.resp = resp
        _settle(self.st, self.t0, failed=resp.status >= 500)
        head = self.head
        no_body = head.method == b"HEAD" or resp.status in (204, 304)
        self.chunked = not no_body and resp.content_length is None
        self.close = not head.keep_alive or self.server.eof
        self.pending = encode_response_head(resp.status, resp.reason, resp.headers, resp.content_length, self.chunked, self.close)
        if self.close:
            self.server.cork_until_close(0 if no_body else resp.content_length)

    def resp_body(self, data: bytes) -> None:
        if not data or self.done:
            return
        out = encode_chunk(data) if self.chunked else data
        if self.pending is not None:
            out = self.pending + out
            self.pending = None
        self.server._write(out)

    def resp_end(self, conn: UpstreamConn) -> None:
        if self.done:
            return
        out = self.pending or b""
        self.pending = None
        if self.chunked:
            out += LAST_CHUNK
        if out:
            self.server._write(out)
        if self.paused:
            conn.transport.resume_reading()
        self.server.proxy.pool.release(conn)
        assert self.resp is not None
        self._finish(self.resp.status, not self.close)

    def upstream_failed(self, conn: UpstreamConn, err: ProxyError) -> None:
        if self.done:
            return
        if self.resp is None:
            assert self.st is not None
            _settle(self.st, self.t0, failed=True)
        self.server.proxy.pool.discard(conn)
        assert self.ep is not None
        reason = f"endpoint {self.ep.namespace}/{self.ep.pod}: {err.reason}"
        if self.pending is not None or self.resp is None:  # nothing of the response sent yet
            self._answer(err.status, reason)
        else:  # too late for a status: cut the response short so the client sees it
            log.info("outbound http %s: response cut short: %s", self.server.target.source_ip, reason)
            reset_transport(self.server.transport)
            self.server.closed = True
            self._finish(err.status, False)

    # ---- endings ----

    def _answer(self, status: int, reason: str) -> None:
        server, head = self.server, self.head
        keep = head.keep_alive and not server.eof and status != 400
        log.info("outbound http %s %s%s -> %d: %s", server.target.source_ip, head.method.decode(), head.url.decode("latin-1")[:200], status, reason)
        if not server.transport.is_closing():
            server._write(_error_response(status, reason, close=not keep))
        self._finish(status, keep)

    def _finish(self, status: int, keep: bool) -> None:
        self.done = True
        server = self.server
        latency = (time.monotonic() - self.started) * 1000
        failure = status >= 500 or status == 0
        server._dst.response(status, failure, latency)
        self.rstats.response(status, failure, latency)
        server._direct_done(keep)

    def abort(self) -> None:
        """The client connection is gone."""
        if self.done:
            return
        self.done = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.st is not None and self.resp is None:
            _settle(self.st, self.t0, failed=False)
        conn = self.conn
        if conn is not None:
            conn.direct = None
            self.server.proxy.pool.discard(conn)


def http_target(view: NodeView, target: ServicePortTarget, source_ip: str, authz: Authorizer | None = None) -> HttpTarget:
    src = view.local_pod(source_ip)
    return HttpTarget(view, target, source_ip, src.identity if src is not None else None, authz)
