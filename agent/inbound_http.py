"""HTTP/1.1 at the destination: route-level authorization of each request a client sends to a local
pod, whichever way it arrived (an mTLS tunnel stream from another node, the plaintext 4143 inbound,
a captured connection).

The source node is not trusted to enforce the destination's policy, so when the pod port is served
as HTTP (nodemesh/authz_routes.py: its Server says HTTP/1, or route policies on an unknown-protocol
Server and the client speaks HTTP/1), the inbound side parses the requests itself:

    stream ─ InboundHttpServer (http_proxy.Http1Server: the same parser, framing checks, deadlines)
              └ per request: match the HTTPRoutes of the services that send to this pod port
                (agent/routes.py) → Authorizer.check_http(subject, route) → 403 with
                l5d-proxy-error (the connection stays) | relay over one keep-alive connection to
                the pod (http_proxy.Exchange's request/response streaming).

The connection itself was opened by `authorize_any_route` (some policy could allow the client);
between requests the server's `authz_subject` is that gate, during a request the request's own
subject, so a policy change cuts the connection when the gate closes or the in-flight request is
no longer allowed (Authorizer.revalidate), and denies the next requests otherwise.
Inbound request_total/response_total carry direction="inbound", tls and client_id (as Linkerd's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.agent.detect import DETECT_TIMEOUT, Protocol, classify
from nodemesh.agent.http_proxy import Exchange, Http1Server, HttpProxy, ProxyError, UpstreamConn, _Request
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.outbound import DialError, ListenerContext, Upstream, dial
from nodemesh.agent.relay import reset_transport
from nodemesh.agent.workloads import NodeView
from nodemesh.authz_routes import InboundHttp, inbound_http, policy_route_name
from nodemesh.fastpath import Head, TcpStats
from nodemesh.nodeconfig import WorkloadPod

log = logging.getLogger(__name__)

ParentKey = tuple[str, str, int]


@dataclass(frozen=True)
class InboundTarget:
    """What one inbound HTTP connection serves: a local pod port, for one (authenticated) client."""

    view: NodeView
    pod: WorkloadPod
    port: int
    subject: Subject  # the connection's gate (any_route=True), re-checked between requests
    authz: Authorizer
    parents: tuple[ParentKey, ...]  # service ports whose endpoints include this pod port
    tls: bool

    @property
    def source_ip(self) -> str:  # Http1Server's log lines
        return self.subject.client.ip


def http_mode(ctx: ListenerContext, pod: WorkloadPod, port: int) -> InboundHttp:
    """How the inbound side serves pod:port (InboundHttp.NO without policy or an L7 stack)."""
    if ctx.authz is None or ctx.l7 is None:
        return InboundHttp.NO
    return inbound_http(ctx.authz.policy, pod.namespace, pod.name, port)


def service_parents(view: NodeView, pod_ip: str, port: int) -> tuple[ParentKey, ...]:
    """The (namespace, service, port) parents whose HTTPRoutes a request to pod_ip:port is matched
    against: every service port that has the pod port among its endpoints."""
    found = {(t.service.namespace, t.service.name, t.port.port) for t in view.service_ports.values()
             if any(e.ip == pod_ip and e.port == port for e in t.port.endpoints)}
    return tuple(sorted(found))


class InboundHttpServer(Http1Server):
    """One inbound client connection served request by request (no balancing: the pod is fixed)."""

    def __init__(self, proxy: HttpProxy, target: InboundTarget, stats: TcpStats, connections: set[asyncio.BaseTransport],
                 metrics: ProxyMetrics, connect_timeout: float, upstream: UpstreamConn | None = None) -> None:
        self.inbound = target
        self._inflight: Subject | None = None
        self.upstream = upstream  # the keep-alive connection to the pod (dialed again when it goes)
        self._out: bytearray | None = None  # coalesced writes (_write)
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        super().__init__(proxy, target, stats, connections)  # type: ignore[arg-type]  (InboundTarget has what Http1Server reads)

    # Authorizer.revalidate reads and clears this: the request's subject while one is in flight,
    # else the connection's gate.
    @property
    def authz_subject(self) -> Subject | None:  # type: ignore[override]
        return self._inflight if self._inflight is not None else self.inbound.subject

    @authz_subject.setter
    def authz_subject(self, subject: Subject | None) -> None:
        self._inflight = subject

    def _dst_stats(self) -> Any:
        t = self.inbound
        return self.proxy.http_metrics.dst("inbound", f"{t.pod.ip}:{t.port}", t.pod.namespace, "", tls=t.tls,
                                           client_id=t.subject.client.identity or "")

    def _start_direct(self, head: Head) -> bool:
        return False  # every request goes through InboundExchange (authorization first)

    # Writes of one loop iteration (a response head and its first body bytes) leave as one segment.
    def _write(self, data: bytes) -> None:
        self.stats.add_write(len(data))
        if self._out is None:
            self._out = bytearray(data)
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._out += data

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and not self.transport.is_closing():
            self.transport.write(bytes(out))

    def _close(self) -> None:
        self._flush()
        super()._close()

    async def _exchange(self, req: _Request) -> bool:
        return await InboundExchange(self, req).run()

    def match_route(self, head: Head) -> str | None:
        """The HTTPRoute (as route policies name it) the request matches, or None."""
        routes, t = self.proxy.routes, self.inbound
        path = head.url.split(b"?", 1)[0].decode("latin-1")
        hdrs: dict[bytes, bytes] | None = None
        for ns, svc, port in t.parents:
            if not routes.rules_for(ns, svc, port):
                continue
            if hdrs is None:
                hdrs = {n.lower(): v for n, v in head.headers}
            rule = routes.match(ns, svc, port, head.method, path, hdrs)
            if rule is not None:
                return policy_route_name(rule.route, t.pod.namespace)
        return None

    async def upstream_conn(self) -> UpstreamConn:
        conn = self.upstream
        if conn is not None and not conn.lost and not conn.transport.is_closing():
            return conn
        self.drop_upstream()
        t = self.inbound
        try:
            transport, up = await dial((t.pod.ip, t.port), None, self._connect_timeout)
        except DialError as exc:
            self._metrics.error("inbound", exc.error)
            raise ProxyError(exc.status if exc.status in (502, 504) else 502, f"pod {t.pod.namespace}/{t.pod.name}: {exc}") from None
        self.upstream = conn = upstream_conn(self._metrics, t.pod, t.port, transport, up)
        if conn.lost:
            raise ProxyError(502, f"pod {t.pod.namespace}/{t.pod.name} closed the connection")
        return conn

    def drop_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.lost = True
            conn.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.drop_upstream()


def upstream_conn(metrics: ProxyMetrics, pod: WorkloadPod, port: int, transport: asyncio.Transport, up: Upstream) -> UpstreamConn:
    stats = metrics.tcp("inbound", "dst", pod.namespace, "")
    stats.opened()
    conn = UpstreamConn(("inbound", pod.ip, port), stats)
    conn.take(transport, bytes(up.pending))
    if up.lost or up.eof:
        conn.lost = True
    return conn


class InboundExchange(Exchange):
    """One request: route → authorize → 403, or relay to the pod and stream the answer back."""

    def __init__(self, server: InboundHttpServer, req: _Request) -> None:
        super().__init__(server.proxy, server.target, req, server)
        self.inbound_server = server

    async def run(self) -> bool:
        server, req, head = self.inbound_server, self.req, self.req.head
        t = server.inbound
        route = server.match_route(head)
        subject = replace(t.subject, route=route, any_route=False)
        keep = head.keep_alive and not server.eof
        status = 0
        try:
            d = t.authz.check_http(subject, route)
            if not d.allowed:
                raise ProxyError(403, d.reason)
            server.authz_subject = subject  # in flight: a policy change re-checks this request
            status, reusable = await self._forward(server)
            keep = keep and not server.closed
            if not reusable:
                server.drop_upstream()
        except ProxyError as exc:
            status = exc.status
            keep = self._answer(exc.status, exc.reason, keep and exc.status != 400)
        finally:
            server.authz_subject = None
        latency = (time.monotonic() - req.started) * 1000
        server._dst.response(status, status >= 500 or status == 0, latency)
        return keep

    async def _forward(self, server: InboundHttpServer) -> tuple[int, bool]:
        conn = await server.upstream_conn()
        pod = server.inbound.pod
        try:
            head_fut = conn.start(self.req.head.method == b"HEAD")
            await self._stream_request(conn)
            resp = await head_fut
            await self._stream_response(conn, resp)
        except ProxyError as exc:
            server.drop_upstream()
            raise ProxyError(exc.status, f"pod {pod.namespace}/{pod.name}: {exc.reason}") from None
        conn.head = None  # idle until the next request (bytes now would make it unusable)
        return resp.status, conn.reusable


def serve(ctx: ListenerContext, transport: Any, pod: WorkloadPod, port: int, subject: Subject, stats: TcpStats,
          pending: bytes, eof: bool, tls: bool, upstream: UpstreamConn | None = None) -> InboundHttpServer:
    """Hand an accepted, authorized (by `authorize_any_route`) inbound connection or tunnel stream
    to a per-request server. `upstream`: the pod connection already dialed, if any."""
    assert ctx.l7 is not None and ctx.authz is not None
    view = ctx.view()
    target = InboundTarget(view, pod, port, replace(subject, any_route=True, route=None), ctx.authz,
                           service_parents(view, pod.ip, port), tls)
    server = InboundHttpServer(ctx.l7, target, stats, ctx.connections, ctx.metrics, ctx.connect_timeout, upstream)
    server.take(transport, pending, eof)
    return server


def gate(ctx: ListenerContext, pod: WorkloadPod, port: int, subject: Subject) -> Subject:
    """The subject to authorize a new inbound connection with: for a port served as HTTP, the
    any-route gate (a client only route policies allow is let in, then decided per request)."""
    return subject if http_mode(ctx, pod, port) is InboundHttp.NO else replace(subject, any_route=True)


def hand_over(ctx: ListenerContext, transport: Any, pod: WorkloadPod, port: int, subject: Subject | None, stats: TcpStats,
              pending: bytes, eof: bool, tls: bool, pod_transport: asyncio.Transport, up: Upstream,
              as_l4: Callable[[bytes, bool, Subject], None]) -> bool:
    """After the pod accepted (and the client was told so): serve the connection as HTTP when the
    port calls for it, detect first when it may, else leave it to the caller (False). `as_l4`
    relays a detected non-HTTP connection the caller's way, re-checked by the given subject."""
    mode = http_mode(ctx, pod, port) if subject is not None else InboundHttp.NO
    if mode is InboundHttp.NO:
        return False
    assert subject is not None
    if mode is InboundHttp.YES:
        serve(ctx, transport, pod, port, subject, stats, pending, eof, tls, upstream_conn(ctx.metrics, pod, port, pod_transport, up))
        return True

    def detected(http1: bool | None, data: bytes, eof: bool) -> None:
        if http1 is None:  # the client left while we listened
            pod_transport.close()
            stats.closed()
            ctx.connections.discard(transport)
            return
        if http1:
            serve(ctx, transport, pod, port, subject, stats, data, eof, tls, upstream_conn(ctx.metrics, pod, port, pod_transport, up))
            return
        # Not HTTP: only route policies let it in, and they cannot apply to bytes. Connection level.
        strict = replace(subject, any_route=False)
        assert ctx.authz is not None
        if not ctx.authz.check(strict).allowed:
            ctx.metrics.error("inbound", "unauthorized")
            pod_transport.close()
            stats.closed()
            ctx.connections.discard(transport)
            reset_transport(transport)
            return
        as_l4(data, eof, strict)

    Sniffer(detected, ctx.l7.detect_timeout if ctx.l7 is not None else DETECT_TIMEOUT).start(transport, pending, eof)
    return True


class Sniffer(asyncio.Protocol):
    """InboundHttp.DETECT: hold a connection's first bytes until they say HTTP/1 or not (bounded by
    `timeout`, EOF or 16 KiB), then call `done(is_http1, bytes so far, eof)` once; `is_http1` is
    None when the connection was lost first."""

    def __init__(self, done: Callable[[bool | None, bytes, bool], None], timeout: float = DETECT_TIMEOUT) -> None:
        self._done_cb: Callable[[bool | None, bytes, bool], None] | None = done
        self.data = bytearray()
        self.eof = False
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self.transport: Any = None

    def start(self, transport: Any, pending: bytes, eof: bool) -> None:
        self.transport = transport
        transport.set_protocol(self)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._finish)
        self.data += pending
        self.eof = eof
        if self._decided():
            self._finish()
        else:
            transport.resume_reading()

    def _decided(self) -> bool:
        return self.eof or len(self.data) >= 16384 or classify(bytes(self.data[:64])) is not None

    def _finish(self) -> None:
        cb, self._done_cb = self._done_cb, None
        if cb is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        cb(classify(bytes(self.data[:64])) is Protocol.HTTP1, bytes(self.data), self.eof)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self._decided():
            self._finish()

    def eof_received(self) -> bool:
        self.eof = True
        self._finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        cb, self._done_cb = self._done_cb, None
        if cb is not None:
            cb(None, bytes(self.data), True)
