"""HTTP/2 and gRPC in the node proxy: a client connection the detector found opening with the h2
prior-knowledge preface (what gRPC sends in-mesh) is terminated here, and every stream is routed on
its own.

    client ─ H2Server (h2, server side) ─ per stream: route (agent/routes.py) → backend service →
              authorization (same-node endpoint) → L7Balancer (P2C + peak EWMA, breakers) →
              H2Pool: multiplexed upstream h2 connections per endpoint (the pod directly, or the
              remote node through the same mTLS tunnel / tunnel handshake as L4) → H2Upstream

Flow control is end to end: a DATA frame is credited back (stream WINDOW_UPDATE) to the side that
sent it only after it was handed to the other side's h2 connection within that side's window, and
the write side waits while a transport is over its high-water mark. So one stream buffers at most
its window (STREAM_WINDOW); connection windows are credited on receipt so one slow stream does not
stall the others. Bodies are never read whole, except a request body of at most 64 KiB kept for a
route that retries (Linkerd's rule).

Trailers pass through both ways. gRPC status comes from a trailers-only head or the trailers; it
classifies the response (anything but OK is a failure, Linkerd's rule), feeds the breaker, and is
the `grpc_status_code` label of response_total. Retries: HTTP statuses and gRPC codes from the
route (`retry.linkerd.io/http` / `retry.linkerd.io/grpc`), within the route's retry budget, only
while nothing of the response went to the client: a gRPC status is seen in a trailers-only head, or
when the first thing after the head is the trailers (Linkerd's PeekTrailersBody). Errors the proxy
answers itself carry `l5d-proxy-error`; gRPC callers get them as a trailers-only grpc-status
(no endpoints → UNAVAILABLE, route timeout → DEADLINE_EXCEEDED, denied → PERMISSION_DENIED).
A protocol error on the client connection ends it with a GOAWAY whose debug data says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from nodemesh import grpc_status
from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.agent.decide import DstLabels, Plan, plan_for_endpoint
from nodemesh.agent.h2_messages import Headers, RequestInfo, error_response, goaway, grpc_trailers, is_failure, preface_error, request_info, status_of
from nodemesh.agent.handshake import encode_request
from nodemesh.agent.l7_balance import AllEjected, EndpointState, ep_key
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.outbound import DialError, dial
from nodemesh.agent.relay import reset_transport
from nodemesh.agent.retry_budget import MAX_RETRYABLE_BODY
from nodemesh.agent.http_proxy import ProxyError, backend_target
from nodemesh.agent.routes import Backend, Rule
from nodemesh.agent.workloads import ServicePortTarget
from nodemesh.authz import ClientInfo
from nodemesh.fastpath import HttpStats, TcpStats

if TYPE_CHECKING:
    from nodemesh.agent.http_proxy import HttpProxy, HttpTarget
    from nodemesh.agent.outbound import OutboundConnection

log = logging.getLogger(__name__)

STREAM_WINDOW = 256 * 1024  # per-stream receive window we advertise: what one stream may buffer here
CONN_WINDOW = 4 * 1024 * 1024  # connection receive window (credited on receipt)
MAX_STREAMS = 128  # concurrent streams we accept per client connection
MAX_STREAMS_PER_UPSTREAM = 100  # streams we open per upstream connection before dialing another
MAX_HEADER_LIST = 64 * 1024
POOL_ROUNDS = 8  # bounded acquire loop (dials that fail for others, full connections)


class StreamGone(Exception):
    """The stream (or its connection) closed under a sender."""


def _settings(client: bool) -> dict[int, int]:
    s = {SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
    if client:
        s[SettingCodes.ENABLE_PUSH] = 0
    else:
        s[SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
    return s


# ---- a body in flight: what one side received for a stream, until the other side takes it ------


class Body:
    """DATA (with its flow-controlled length), trailers and the end of one direction of a stream.
    Bounded by the stream window: nothing is credited back until the consumer forwarded it."""

    __slots__ = ("_items", "_waiter", "ended", "error")

    def __init__(self) -> None:
        self._items: deque[tuple[bytes, int] | list[tuple[bytes, bytes]] | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False  # END_STREAM (or trailers) received
        self.error: Exception | None = None

    def data(self, data: bytes, flow: int) -> None:
        self._items.append((data, flow))
        self._wake()

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._items.append(headers)
        self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._items.append(None)
            self._wake()

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    @property
    def empty_and_ended(self) -> bool:
        return self.ended and len(self._items) == 1 and self._items[0] is None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def peek(self) -> tuple[bytes, int] | list[tuple[bytes, bytes]] | None:
        while not self._items:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items[0]

    async def get(self) -> tuple[bytes, int] | list[tuple[bytes, bytes]] | None:
        """(data, flow) | trailers (a list) | None at the end; raises the error it failed with."""
        item = await self.peek()
        self._items.popleft()
        return item


# ---- one h2 connection, either side ------------------------------------------------------------


class H2Peer(asyncio.Protocol):
    """The byte plumbing shared by the client-facing server and the upstream connections: h2 state,
    writes, window waits, write backpressure, and crediting received data back."""

    def __init__(self, client_side: bool, stats: TcpStats) -> None:
        # Inbound headers are validated on both connections; what is forwarded was validated on the
        # way in, so outbound validation and normalization (a large share of h2's cost) are skipped.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.stats = stats
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._flush_soon = False
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._conn_unacked = 0
        self._stream_unacked: dict[int, int] = {}

    def start(self, transport: asyncio.Transport, pending: bytes) -> None:
        self.transport = transport
        transport.set_protocol(self)
        self.h2.initiate_connection()
        self.h2.update_settings(_settings(self.h2.config.client_side))
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        transport.resume_reading()  # the detector may have paused it past its prebuffer
        if pending:
            self.data_received(pending)

    def flush(self) -> None:
        """Write what h2 has queued, once per event-loop turn: many streams' frames share one
        write (one syscall) instead of one each."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_soon = False
        out = self.h2.data_to_send()
        if out and not self.closed and not self.transport.is_closing():
            self.stats.add_write(len(out))
            self.transport.write(out)

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.stats.add_read(len(data))
        if self.closed:
            return
        self._flush_now()  # so that only what this input produces is pending when it fails
        try:
            events = self.h2.receive_data(data)
        except (h2.exceptions.ProtocolError, hyperframe.exceptions.HyperframeError) as exc:
            self.protocol_error(exc)
            return
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self._credit_connection(ev.flow_controlled_length)
            elif isinstance(ev, h2.events.WindowUpdated):
                self._wake_window(ev.stream_id)
                continue
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self._wake_window(0)
                continue
            self.on_event(ev)
        self.flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._wake_window(0)
        self.stats.closed()

    # hooks
    def on_event(self, ev: h2.events.Event) -> None:
        raise NotImplementedError

    def protocol_error(self, exc: Exception) -> None:
        raise NotImplementedError

    # flow control
    def _credit_connection(self, n: int) -> None:
        if n <= 0:
            return
        self._conn_unacked += n
        if self._conn_unacked >= CONN_WINDOW // 4:
            self.h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0

    def credit_stream(self, stream_id: int, n: int) -> None:
        """`n` bytes of this stream were forwarded: let the sender send that much more."""
        if n <= 0 or self.closed:
            return
        total = self._stream_unacked.get(stream_id, 0) + n
        if total < STREAM_WINDOW // 4:
            self._stream_unacked[stream_id] = total
            return
        self._stream_unacked.pop(stream_id, None)
        try:
            self.h2.increment_flow_control_window(total, stream_id=stream_id)
        except h2.exceptions.H2Error:
            return  # the stream ended meanwhile: nothing more will come on it
        self.flush()

    def forget_stream(self, stream_id: int) -> None:
        self._stream_unacked.pop(stream_id, None)
        self._wake_window(stream_id)

    def _wake_window(self, stream_id: int) -> None:
        if stream_id == 0:
            waiters, self._window_waiters = self._window_waiters, {}
            for w in waiters.values():
                if not w.done():
                    w.set_result(None)
            return
        w = self._window_waiters.pop(stream_id, None)
        if w is not None and not w.done():
            w.set_result(None)

    # sending
    async def send_data(self, stream_id: int, data: bytes) -> None:
        """Send within the peer's windows and frame size, waiting for WINDOW_UPDATEs and for the
        transport to drain. Raises StreamGone when the stream or connection went away."""
        pos, n_all = 0, len(data)
        view = memoryview(data)
        while pos < n_all:
            if self.closed:
                raise StreamGone("connection closed")
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                raise StreamGone(f"stream {stream_id} closed") from None
            if window <= 0:
                fut = self._window_waiters.get(stream_id)
                if fut is None or fut.done():
                    fut = self._window_waiters[stream_id] = asyncio.get_running_loop().create_future()
                await fut
                continue
            n = min(window, n_all - pos, self.h2.max_outbound_frame_size)
            try:
                self.h2.send_data(stream_id, view[pos:pos + n].tobytes())
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise StreamGone(f"stream {stream_id} closed") from None
            pos += n
            self.flush()
            if not self._writable.is_set():
                await self._writable.wait()

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        try:
            self.h2.send_headers(stream_id, list(headers), end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise StreamGone(f"stream {stream_id}: {exc}") from None
        self.flush()

    def end_stream(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise StreamGone(f"stream {stream_id}: {exc}") from None
        self.flush()

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()


async def pump(src: H2Peer, src_id: int, body: Body, dst: H2Peer, dst_id: int) -> list[tuple[bytes, bytes]] | None:
    """Forward one direction of a stream: data within dst's windows (crediting src after each
    piece), then trailers or END_STREAM. Returns the trailers, if any."""
    while True:
        item = await body.get()
        if item is None:
            dst.end_stream(dst_id)
            return None
        if isinstance(item, list):
            dst.send_headers(dst_id, item, end_stream=True)
            return item
        data, flow = item
        if data:
            await dst.send_data(dst_id, data)
        src.credit_stream(src_id, flow)


# ---- upstream: one multiplexed h2 connection to an endpoint --------------------------------------


class UpStream:
    __slots__ = ("id", "response", "head_ended", "body")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.response: asyncio.Future[list[tuple[bytes, bytes]]] = asyncio.get_running_loop().create_future()
        self.head_ended = False
        self.body = Body()

    def fail(self, exc: Exception) -> None:
        if not self.response.done():
            self.response.set_exception(exc)
            self.response.exception()  # retrieved: whoever awaits it gets it, no warning otherwise
        self.body.fail(exc)


class H2Upstream(H2Peer):
    def __init__(self, pool: H2Pool, key: tuple[Any, ...], stats: TcpStats, name: str) -> None:
        super().__init__(True, stats)
        self.pool = pool
        self.key = key
        self.name = name  # "namespace/pod", for errors
        self.streams: dict[int, UpStream] = {}
        self.reserved = 0
        self.goaway = False

    @property
    def usable(self) -> bool:
        return not self.closed and not self.goaway and not self.transport.is_closing()

    def capacity(self) -> int:
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_UPSTREAM)
        return limit - self.reserved

    def open(self, headers: Headers, end_stream: bool) -> UpStream:
        if not self.usable:
            raise ProxyError(502, f"upstream connection to {self.name} is closing")
        sid = self.h2.get_next_available_stream_id()
        st = UpStream(sid)
        self.streams[sid] = st
        try:
            self.send_headers(sid, headers, end_stream)
        except StreamGone as exc:
            self.streams.pop(sid, None)
            raise ProxyError(502, f"upstream {self.name} refused the request head: {exc}") from None
        return st

    def finish(self, st: UpStream | None) -> None:
        """The exchange is done with its reservation (and stream): reset what is still open."""
        self.reserved -= 1
        if st is not None and self.streams.pop(st.id, None) is not None:
            if not (st.body.ended and self._closed_locally(st.id)):
                self.reset(st.id, ErrorCodes.CANCEL)
            self.forget_stream(st.id)
        if self.goaway and not self.streams and not self.closed:
            self._flush_now()
            self.transport.close()

    def _closed_locally(self, sid: int) -> bool:
        s = self.h2.streams.get(sid)
        return s is None or s.closed or s.state_machine.state.name in ("HALF_CLOSED_LOCAL", "CLOSED")

    def on_event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        st = self.streams.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.ResponseReceived):
            if st is not None and not st.response.done():
                st.head_ended = ev.stream_ended is not None
                st.response.set_result(list(ev.headers))
        elif feed_body(ev, st):
            pass
        elif isinstance(ev, h2.events.StreamReset):
            if st is not None:
                st.fail(ProxyError(502, f"upstream {self.name} reset the stream ({_code_name(ev.error_code)})"))
            self.forget_stream(ev.stream_id)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id if ev.last_stream_id is not None else 0
            why = (ev.additional_data or b"").decode("latin-1", "replace")
            for s in list(self.streams.values()):
                if s.id > last:
                    s.fail(ProxyError(502, f"upstream {self.name} went away before the stream ({_code_name(ev.error_code)} {why})".rstrip()))
            if not self.streams:
                self._flush_now()
                self.transport.close()

    def protocol_error(self, exc: Exception) -> None:
        log.info("upstream h2 connection to %s: protocol error: %s", self.name, exc)
        self._flush_now()  # h2's GOAWAY
        self._lost(ProxyError(502, f"upstream {self.name} broke the HTTP/2 protocol: {exc}"))
        if not self.transport.is_closing():
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost(ProxyError(502, f"upstream connection to {self.name} lost: {exc or 'closed'}"))

    def _lost(self, err: ProxyError) -> None:
        self.closed = True
        for st in list(self.streams.values()):
            st.fail(err)
        self.pool.forget(self)


class H2Pool:
    """Multiplexed upstream connections per endpoint (and, across nodes, per source identity: the
    tunnel's client certificate is the source workload's, so its connections are not shared)."""

    def __init__(self, metrics: ProxyMetrics, connect_timeout: float) -> None:
        self._metrics = metrics
        self._timeout = connect_timeout
        self._conns: dict[tuple[Any, ...], list[H2Upstream]] = {}
        self._dialing: dict[tuple[Any, ...], asyncio.Future[None]] = {}
        self.tunnels: Any = None  # outbound.ListenerContext.tunnels, set at each hand-over

    @staticmethod
    def key(plan: Plan) -> tuple[Any, ...]:
        assert plan.target is not None
        return (ep_key(plan.target), plan.kind, plan.src_identity if plan.kind == "remote" else None)

    def connections(self, plan: Plan) -> list[H2Upstream]:
        return list(self._conns.get(self.key(plan), ()))

    async def acquire(self, plan: Plan) -> H2Upstream:
        """A connection with a stream reserved for the caller (release with conn.finish)."""
        key = self.key(plan)
        for _ in range(POOL_ROUNDS):
            for c in self._conns.get(key, ()):
                if c.usable and c.capacity() > 0:
                    c.reserved += 1
                    return c
            fut = self._dialing.get(key)
            if fut is not None:
                await asyncio.shield(fut)  # raises the dial's DialError for everyone waiting
                continue
            fut = self._dialing[key] = asyncio.get_running_loop().create_future()
            try:
                conn = await self._dial(plan, key)
            except BaseException as exc:
                fut.set_exception(exc if isinstance(exc, DialError) else DialError("connect_failed", "dial cancelled"))
                fut.exception()
                raise
            finally:
                self._dialing.pop(key, None)
            self._conns.setdefault(key, []).append(conn)
            fut.set_result(None)
        raise DialError("connect_failed", f"no upstream h2 connection with a free stream after {POOL_ROUNDS} tries")

    async def _dial(self, plan: Plan, key: tuple[Any, ...]) -> H2Upstream:
        assert plan.target is not None and plan.connect is not None
        tls = plan.kind == "remote" and self.tunnels is not None
        if tls:  # cross-node: the mTLS tunnel the L4 path uses
            transport, up = await self.tunnels.dial(plan, self._timeout)
        else:
            request = encode_request(plan.tunnel) if plan.tunnel is not None else None
            transport, up = await dial(plan.connect, request, self._timeout)
        if up.lost or up.eof:
            reset_transport(transport)
            raise DialError("connect_failed", "upstream closed right after connecting")
        stats = self._metrics.tcp("outbound", "dst", plan.labels.dst_namespace, plan.labels.dst_service,
                                  tls=tls, server_id=plan.target.identity if tls else "")
        stats.opened()
        conn = H2Upstream(self, key, stats, f"{plan.target.namespace}/{plan.target.pod}")
        conn.start(transport, bytes(up.pending))  # an h2 server may send its SETTINGS at once
        return conn

    def forget(self, conn: H2Upstream) -> None:
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def close(self) -> None:
        for conns in list(self._conns.values()):
            for c in list(conns):
                c.closed = True
                if c.transport is not None:
                    c.transport.abort()
        self._conns.clear()


# ---- the client side ---------------------------------------------------------------------------


def feed_body(ev: h2.events.Event, st: UpStream | ClientStream | None) -> bool:
    """DATA, trailers and END_STREAM go into the stream's Body alike on both sides (nowhere once
    the stream is forgotten). True when `ev` was one of them."""
    if isinstance(ev, h2.events.DataReceived):
        if st is not None:
            st.body.data(ev.data, ev.flow_controlled_length)
    elif isinstance(ev, h2.events.TrailersReceived):
        if st is not None:
            st.body.trailers(list(ev.headers))
    elif isinstance(ev, h2.events.StreamEnded):
        if st is not None:
            st.body.end()
    else:
        return False
    return True


class ClientStream:
    __slots__ = ("id", "headers", "body", "task")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = headers
        self.body = Body()
        self.task: asyncio.Task[None] | None = None


class H2Server(H2Peer):
    """One client connection after detection saw the h2 preface; each stream is an Exchange."""

    def __init__(self, proxy: H2Proxy, target: HttpTarget, stats: TcpStats, connections: set[asyncio.BaseTransport],
                 authz: Authorizer | None, resolve: Callable[[], HttpTarget | None]) -> None:
        super().__init__(False, stats)
        self.proxy = proxy
        self.target = target  # as resolved at the hand-over (logs)
        self.resolve = resolve  # the target under the current config: each stream resolves it anew
        self.connections = connections
        self.authz = authz
        self.authz_subject: Subject | None = None  # per request here, not per connection
        self.streams: dict[int, ClientStream] = {}
        self.draining = False  # client sent GOAWAY or EOF: finish what is open, then close
        self._preface: bytearray | None = bytearray()

    def take(self, transport: asyncio.Transport, pending: bytes, eof: bool) -> None:
        self.start(transport, pending)
        if eof:
            self.eof_received()

    def on_event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        st = self.streams.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.RequestReceived):
            st = self.streams[ev.stream_id] = ClientStream(ev.stream_id, list(ev.headers))
            st.task = asyncio.get_running_loop().create_task(Exchange(self.proxy, self, st).run())
        elif feed_body(ev, st):
            pass
        elif isinstance(ev, h2.events.StreamReset):
            self.forget_stream(ev.stream_id)
            if st is not None:
                st.body.fail(StreamGone(f"client reset stream {ev.stream_id}"))
                if st.task is not None:
                    st.task.cancel()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.draining = True
            self._maybe_close()

    def stream_done(self, st: ClientStream) -> None:
        self.streams.pop(st.id, None)
        self.forget_stream(st.id)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.draining and not self.streams and not self.transport.is_closing():
            self._flush_now()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._preface is not None:  # until the preface and the first frame's header are checked
            self._preface += data
            why = preface_error(bytes(self._preface))
            if why == "":
                return  # counted with the rest once decided
            data, self._preface = bytes(self._preface), None
            if why is not None:
                self.stats.add_read(len(data))
                self.protocol_error(h2.exceptions.ProtocolError(why))
                return
        super().data_received(data)

    def protocol_error(self, exc: Exception) -> None:
        """Answer with a GOAWAY naming the error, drop what the failed input produced, close."""
        code = getattr(exc, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
        reason = f"HTTP/2 protocol error: {exc or type(exc).__name__}"
        log.info("outbound h2 from %s: %s; GOAWAY %s", self.target.source_ip, reason, _code_name(code))
        self.h2.data_to_send()  # h2's own GOAWAY (no reason) and any ACKs for the bad input
        if not self.transport.is_closing():
            self.stats.add_write(1)
            self.transport.write(goaway(self.h2.highest_inbound_stream_id, int(code), reason))
            self.transport.close()
        self._cancel_all()

    def eof_received(self) -> bool:
        self.draining = True
        self._maybe_close()
        return True  # keep writing the responses in flight

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.connections.discard(self.transport)
        self._cancel_all()

    def _cancel_all(self) -> None:
        self.closed = True
        for st in list(self.streams.values()):
            st.body.fail(StreamGone("client connection closed"))
            if st.task is not None:
                st.task.cancel()


class Exchange:
    """One client stream through route → backend → endpoint → upstream stream, with retries, the
    route's timeouts, authorization and metrics."""

    def __init__(self, proxy: H2Proxy, server: H2Server, st: ClientStream) -> None:
        self.proxy = proxy
        self.server = server
        self.st = st
        self.info: RequestInfo = request_info(st.headers)
        self.started = time.monotonic()
        self.head_at: float | None = None  # when the response head went to the client
        self.head_sent = False
        self.ended = False  # the response stream was ended towards the client
        self.route_name = "default"
        self.target: HttpTarget = server.target
        self._kept: list[tuple[bytes, int] | list[tuple[bytes, bytes]] | None] | None = None
        self._settled = True  # this attempt's latency went to the balancer
        self._rtt_from = 0.0  # when this attempt's request went out on a ready connection
        self._judged = True  # this attempt's verdict went to the breaker

    async def run(self) -> None:
        http = self.proxy.http
        current = self.server.resolve()  # a long-lived connection sees endpoint churn
        t = self.target = current or self.server.target
        svc, port = t.target.service, t.target.port
        info = self.info
        rule = http.routes.match(svc.namespace, svc.name, port.port, info.method, info.path, info.headers)
        self.route_name = rule.route if rule is not None else "default"
        dst_stats = http.http_metrics.dst("outbound", f"{svc.authority}:{port.port}", svc.namespace, svc.name)
        route_stats = http.http_metrics.route("outbound", self.route_name, svc.namespace, svc.name)
        dst_stats.request()
        route_stats.request()
        status, code = 0, None
        timeout = rule.timeout if rule is not None else None
        try:
            if current is None:
                raise ProxyError(503, f"service {svc.namespace}/{svc.name} port {port.port} is no longer in the config")
            async with asyncio.timeout(timeout):
                status, code = await self._attempts(rule, dst_stats, route_stats)
        except TimeoutError:
            status, code = self._fail(504, f"request timed out after {timeout:g}s (route {self.route_name})", grpc_status.DEADLINE_EXCEEDED)
        except ProxyError as exc:
            status, code = self._fail(exc.status, exc.reason, exc.grpc)
        except StreamGone as exc:
            log.debug("outbound h2 stream %d: %s", self.st.id, exc)
        except asyncio.CancelledError:
            pass  # the client reset the stream or the connection went away
        except Exception:
            log.exception("outbound h2 stream %d from %s failed", self.st.id, t.source_ip)
            self.server.reset(self.st.id, ErrorCodes.INTERNAL_ERROR)
        finally:
            if not self.st.body.ended and not self.server.closed:
                # The answer is complete but the client is still sending: tell it to stop (RFC 9113 8.1).
                self.server.reset(self.st.id, ErrorCodes.NO_ERROR if self.ended else ErrorCodes.CANCEL)
            self.server.stream_done(self.st)
        latency = ((self.head_at or time.monotonic()) - self.started) * 1000
        failure = is_failure(status, code)
        for stats in (dst_stats, route_stats):
            _record(stats, status, code, failure, latency)

    def _fail(self, status: int, reason: str, grpc: int | None) -> tuple[int, int | None]:
        """Answer the stream with an error; returns the (status, grpc code) the client saw."""
        srv, sid, is_grpc = self.server, self.st.id, self.info.grpc
        code = grpc if grpc is not None else grpc_status.for_http_status(status)
        if srv.closed or self.ended:
            return status, None
        if not self.head_sent:
            log.info("outbound h2 %s %s%s -> %s: %s", self.server.target.source_ip, self.info.method.decode("latin-1"),
                     self.info.path[:200], f"grpc-status {code}" if is_grpc else status, reason)
            try:
                srv.send_headers(sid, error_response(status, reason, is_grpc, code), end_stream=True)
            except StreamGone:
                return 0, None
            self.ended = True
            return (200, code) if is_grpc else (status, None)
        log.info("outbound h2 %s: response cut short: %s", self.server.target.source_ip, reason)
        if is_grpc:
            try:
                srv.send_headers(sid, grpc_trailers(code, reason), end_stream=True)
                self.ended = True
                return 200, code
            except StreamGone:
                return 0, None
        srv.reset(sid, ErrorCodes.CANCEL)
        return 0, None

    def _backend_target(self, backend: Backend | None) -> ServicePortTarget:
        return backend_target(self.target, backend)  # HTTP/1 and h2 resolve backendRefs alike

    async def _attempts(self, rule: Rule | None, dst_stats: HttpStats, route_stats: HttpStats) -> tuple[int, int | None]:
        retry = rule.retry if rule is not None else None
        codes = retry.codes if retry is not None else frozenset()
        gcodes = retry.grpc_codes if retry is not None and self.info.grpc else frozenset()
        budget = self.proxy.http.budget(self.route_name) if (codes or gcodes) else None
        retryable = budget is not None and await self._keep_small_body()
        if budget is not None:
            budget.deposit()
        attempt = 0
        while True:
            backend = rule.pick_backend() if rule is not None and rule.backends else None
            tgt = self._backend_target(backend)
            last = not retryable or retry is None or attempt >= retry.attempts
            out = await self._one(tgt, None if last else (codes, gcodes, budget.withdraw if budget is not None else None),
                                  rule.backend_timeout if rule is not None else None)
            if out is not None:
                return out
            attempt += 1
            dst_stats.retry()
            route_stats.retry()

    async def _keep_small_body(self) -> bool:
        """Read the request body when it ends within 64 KiB (then it can be sent again); a bigger one
        is streamed from what was read so far and never retried."""
        kept: list[tuple[bytes, int] | list[tuple[bytes, bytes]] | None] = []
        size = 0
        while True:
            item = await self.st.body.get()
            kept.append(item)
            if item is None or isinstance(item, list):
                self._kept = kept
                return True
            size += len(item[0])
            self.server.credit_stream(self.st.id, item[1])
            if size > MAX_RETRYABLE_BODY:
                self._kept = kept  # a prefix: sent once, then the rest streams
                return False

    async def _one(self, tgt: ServicePortTarget, retry: tuple[frozenset[int], frozenset[int], Any] | None,
                   attempt_timeout: float | None) -> tuple[int, int | None] | None:
        """One attempt: (status, grpc code) after the response went to the client, or None when it
        was retryable, the budget had room, and it was discarded."""
        t = self.target
        usable = [e for e in tgt.port.endpoints if e.node == t.view.node or t.view.node_info(e.node) is not None]
        if not usable:
            raise ProxyError(503, f"no endpoints for service {tgt.service.namespace}/{tgt.service.name} port {tgt.port.port}")
        try:
            ep, est = self.proxy.http.balancer.pick(usable)
        except AllEjected as exc:
            raise ProxyError(503, f"{exc} for service {tgt.service.namespace}/{tgt.service.name}") from None
        self._settled = False
        started = self._rtt_from = time.monotonic()
        labels = DstLabels(tgt.service.namespace, tgt.service.name, ep.pod, f"{tgt.service.authority}:{tgt.port.port}")
        plan = plan_for_endpoint(t.view, ep, labels, t.src_identity)
        authz = self.server.authz
        if plan.kind == "local" and authz is not None:
            # Same node: this proxy is the pod's inbound too, so it authorizes each request here
            # (a remote endpoint's node authorizes the tunnel this connection runs in).
            d = authz.check_http(Subject(ClientInfo(t.src_identity, t.source_ip), ep.namespace, ep.pod, ep.ip, ep.port), self.route_name)
            if not d.allowed:
                self._settled = self._judged = True
                est.load.finish(est.load.rtt_ms, time.monotonic())  # no verdict on the endpoint
                est.breaker.probing = False
                raise ProxyError(403, f"unauthorized request to {ep.namespace}/{ep.pod}: {d.reason}", grpc_status.PERMISSION_DENIED)
        self._judged = False
        try:
            async with asyncio.timeout(attempt_timeout):
                return await self._send(plan, est, retry, started)
        except TimeoutError:
            self._settle(est, started, failed=True)
            raise ProxyError(504, f"backend request timed out after {attempt_timeout:g}s", grpc_status.DEADLINE_EXCEEDED) from None
        except ProxyError:
            self._settle(est, started, failed=True)
            raise
        except asyncio.CancelledError:
            if not self._settled:  # the route's timeout ran out before the endpoint answered
                self._settle(est, started, failed=True)
            raise
        finally:
            # The client went away (or reset) first: no verdict on the endpoint, but a probe in
            # flight must not keep the breaker waiting for one.
            self._settle(est, started, failed=False, latency_only=True)
            if not self._judged:
                est.breaker.probing = False

    def _settle(self, est: EndpointState, started: float, failed: bool, latency_only: bool = False) -> None:
        """Feed the balancer the latency (once per attempt) and the breaker the verdict (once)."""
        if not self._settled:
            self._settled = True
            now = time.monotonic()  # from a ready connection, as http_proxy._settle explains
            est.load.finish((now - max(started, self._rtt_from)) * 1000, now)
        if latency_only or self._judged:
            return
        self._judged = True
        if failed:
            est.breaker.failure()
        else:
            est.breaker.success()

    async def _send(self, plan: Plan, est: EndpointState, retry: tuple[frozenset[int], frozenset[int], Any] | None,
                    started: float) -> tuple[int, int | None] | None:
        assert plan.target is not None
        ep = plan.target
        try:
            conn = await self.proxy.pool.acquire(plan)
        except DialError as exc:
            self.proxy.http.metrics.error("outbound", exc.error)
            raise ProxyError(exc.status if exc.status in (502, 504) else 502, f"endpoint {ep.namespace}/{ep.pod}: {exc}") from None
        self._rtt_from = time.monotonic()
        up: UpStream | None = None
        feeder: asyncio.Task[None] | None = None
        try:
            kept = self._kept
            if kept is None and self.st.body.empty_and_ended:
                kept = [None]
            up = conn.open(self.st.headers, end_stream=kept == [None])
            if kept is not None and kept != [None]:
                await self._send_kept(conn, up, kept)
            if kept is None or (kept and kept[-1] is not None and not isinstance(kept[-1], list)):
                feeder = asyncio.get_running_loop().create_task(self._feed(conn, up))
            resp = await up.response
            status = status_of(resp)
            code = grpc_status.status_of(resp) if up.head_ended else None
            if retry is not None:
                again = self._worth_retrying(status, code, retry)
                if not again and self.info.grpc and status == 200 and not up.head_ended and retry[1]:
                    again = await self._retry_on_trailers(up, retry)
                if again and (retry[2] is None or retry[2]()):
                    self._settle(est, started, failed=True)
                    return None
            self._settle(est, started, failed=False, latency_only=True)
            self.server.send_headers(self.st.id, resp, end_stream=up.head_ended)
            self.head_sent = True
            self.head_at = time.monotonic()
            if up.head_ended:
                self.ended = True
            else:
                trailers = await pump(conn, up.id, up.body, self.server, self.st.id)
                self.ended = True
                if trailers is not None:
                    code = grpc_status.status_of(trailers)
            if self.info.grpc and code is None and status == 200:
                code = grpc_status.UNKNOWN  # a gRPC response must end with grpc-status
            self._settle(est, started, failed=is_failure(status, code if self.info.grpc else None))
            return status, code if self.info.grpc else None
        except ProxyError as exc:
            raise ProxyError(exc.status, f"endpoint {ep.namespace}/{ep.pod}: {exc.reason}", exc.grpc) from None
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
            conn.finish(up)

    @staticmethod
    def _worth_retrying(status: int, code: int | None, retry: tuple[frozenset[int], frozenset[int], Any]) -> bool:
        return status in retry[0] or (code is not None and code in retry[1])

    @staticmethod
    async def _retry_on_trailers(up: UpStream, retry: tuple[frozenset[int], frozenset[int], Any]) -> bool:
        """Linkerd's PeekTrailersBody: a gRPC response whose first frame after the head is its
        trailers can still be classified (and retried) before anything reached the client."""
        first = await up.body.peek()
        if isinstance(first, list):
            code = grpc_status.status_of(first)
            return code is not None and code in retry[1]
        return False

    async def _send_kept(self, conn: H2Upstream, up: UpStream, kept: list[Any]) -> None:
        for item in kept:
            if item is None:
                conn.end_stream(up.id)
            elif isinstance(item, list):
                conn.send_headers(up.id, item, end_stream=True)
            elif item[0]:
                await conn.send_data(up.id, item[0])

    async def _feed(self, conn: H2Upstream, up: UpStream) -> None:
        """The rest of the request body, streamed (the upstream may answer before it ends)."""
        try:
            await pump(self.server, self.st.id, self.st.body, conn, up.id)
        except (StreamGone, ProxyError):
            pass


def _record(stats: HttpStats, status: int, code: int | None, failure: bool, latency_ms: float) -> None:
    if code is not None and status == 200:
        stats.grpc_response(code, failure, latency_ms)
    else:
        stats.response(status, failure, latency_ms)


def _code_name(code: Any) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


# ---- the shared h2 state of one node proxy ------------------------------------------------------


class H2Proxy:
    """What every h2 client connection of one NodeProxy shares. Routes, balancer, retry budgets and
    golden metrics are the HTTP/1 path's (one view of a service, whatever the protocol)."""

    def __init__(self, http: HttpProxy, connect_timeout: float = 5.0) -> None:
        self.http = http
        self.pool = H2Pool(http.metrics, connect_timeout)

    def take_over(self, conn: OutboundConnection) -> bool:
        """Serve `conn` (detection saw the h2 preface) here; False when it is not a service port."""
        from nodemesh.agent.http_proxy import http_target

        orig = conn.orig_dst
        view = conn.ctx.view()
        target = view.service_port(*orig) if orig is not None else None
        if target is None or conn._stats is None:
            return False
        peer = conn.transport.get_extra_info("peername")
        self.pool.tunnels = getattr(conn.ctx, "tunnels", None)
        view_of = conn.ctx.view

        def resolve() -> HttpTarget | None:
            v = view_of()
            tgt = v.service_port(*orig)
            return http_target(v, tgt, peer[0]) if tgt is not None else None

        server = H2Server(self, http_target(view, target, peer[0]), conn._stats, conn.ctx.connections, conn.ctx.authz, resolve)
        pending, conn.pending = bytes(conn.pending), bytearray()
        server.take(conn.transport, pending, conn.eof)
        return True

    def close(self) -> None:
        self.pool.close()
