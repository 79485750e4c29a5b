"""The inbound listener (4143): tunnel handshake → local pod check → connect to the pod → relay.

Another node's proxy connects here and names the pod it wants (`CONNECT ip:port NMTUN/1`). The
target must be a meshed pod scheduled on this node (404 otherwise: this port is not an open relay);
the reply is 200 only once the pod accepted the connection (502/504 when it did not), so the far
side never relays into a void. Bytes after the request head are the client's first payload.
"""

from __future__ import annotations

import asyncio
import logging

from nodemesh.agent import inbound_http
from nodemesh.agent.authorizer import Subject
from nodemesh.agent.handshake import HandshakeError, RequestParser, TunnelRequest, encode_response
from nodemesh.agent.outbound import PREBUFFER, DialError, ListenerContext, dial
from nodemesh.agent.relay import Relay
from nodemesh.authz import ClientInfo
from nodemesh.fastpath import TcpStats

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds a peer gets to send a complete request head


class InboundConnection(asyncio.Protocol):
    tunnel_reply = True  # answer the tunnel handshake; agent/capture.py's captured clients never sent one

    def __init__(self, ctx: ListenerContext, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.request: TunnelRequest | None = None
        self.src_identity: str | None = None  # claimed by the handshake; verified by mTLS later
        self.pending = bytearray()
        self.eof = False
        self._parser = RequestParser()
        self._stats: TcpStats | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshake_timeout = handshake_timeout
        self.authz_subject: Subject | None = None  # set once authorized; re-checked on policy change

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.connections.add(transport)
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self._on_timeout)

    def _open_stats(self, ns: str) -> None:
        # Labels are known only once the head is parsed, and open/close must hit the same series.
        if self._stats is None:
            self._stats = self.ctx.metrics.tcp("inbound", "src", ns, "")
            self._stats.opened()

    def _refuse(self, status: int, reason: str, error: str) -> None:
        if self.transport.is_closing():
            return  # already refused (or the peer left): count each connection's failure once
        self._open_stats("")
        self.ctx.metrics.error("inbound", error)
        log.info("inbound from %s refused (%s): %s", self.transport.get_extra_info("peername"), status, reason)
        self.transport.write(encode_response(status, reason))
        self.transport.close()  # graceful: the reply must arrive before the FIN

    def _on_timeout(self) -> None:
        if self.request is None:
            self._refuse(408, "handshake timed out", "handshake_error")

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            self.pending += data
            if len(self.pending) > PREBUFFER:
                self.transport.pause_reading()
            return
        if self.transport.is_closing():
            return  # already refused; ignore the rest of a bad head
        try:
            parsed = self._parser.feed(data)
        except HandshakeError as exc:
            self._refuse(exc.status, str(exc), "handshake_error")
            return
        if parsed is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.request, leftover = parsed
        self.src_identity = self.request.src_identity
        self.pending += leftover
        self.transport.pause_reading()  # until the pod answers; the kernel buffers meanwhile
        self._task = asyncio.get_running_loop().create_task(self._connect(self.request))

    def eof_received(self) -> bool:
        self.eof = True
        if self.request is None:
            self._refuse(400, "connection closed before the handshake completed", "handshake_error")
            return True  # _refuse closes after the reply is flushed
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connections.discard(self.transport)
        if self._timer is not None:
            self._timer.cancel()
        self._open_stats("")
        self._stats.closed()  # type: ignore[union-attr]
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _connect(self, req: TunnelRequest) -> None:
        ctx = self.ctx
        pod = ctx.view().local_pod(req.dst_ip)
        if pod is None or (req.dst_pod is not None and req.dst_pod != f"{pod.namespace}/{pod.name}"):
            # A mismatch means the sender's view is stale (the IP now belongs to another pod).
            self._refuse(404, f"{req.dst_pod or req.dst_ip} is not a meshed pod on this node", "unknown_pod")
            return
        self._open_stats(pod.namespace)
        if ctx.authz is not None:
            # The client identity is the handshake's claim today; the mTLS work makes it the verified
            # peer certificate's. The address is the sending node's (the tunnel does not carry the pod's).
            peer = self.transport.get_extra_info("peername")
            subject = Subject(ClientInfo(self.src_identity, peer[0] if peer else ""), pod.namespace, pod.name, pod.ip, req.dst_port, plaintext=True)
            # Everything on this path is plaintext from off the mesh (captured, or 4143 from another
            # node; same-node meshed traffic is authorized in outbound.py): strict refuses it first.
            decision = ctx.authz.check_plaintext(subject, "inbound_port" if self.tunnel_reply else "captured")
            if not decision.allowed:
                self._refuse(403, decision.reason, "plaintext_refused")
                return
            subject = inbound_http.gate(ctx, pod, req.dst_port, subject)  # HTTP ports: route policies are decided per request
            decision = ctx.authz.check(subject)
            if not decision.allowed:
                self._refuse(403, decision.reason, "unauthorized")
                return
            self.authz_subject = subject
        try:
            upstream, up = await dial((req.dst_ip, req.dst_port), None, ctx.connect_timeout)
        except DialError as exc:
            self._refuse(exc.status, str(exc), exc.error)
            return
        if self.transport.is_closing() or up.lost:
            upstream.close()
            self._refuse(502, "pod closed the connection", "connect_failed")
            return
        if self.tunnel_reply:
            self.transport.write(encode_response(200))
        client = self.transport

        def relay(pending: bytes, eof: bool, subject: Subject | None = None) -> None:
            if subject is not None:
                self.authz_subject = subject
            up_stats = ctx.metrics.tcp("inbound", "dst", pod.namespace, "")
            up_stats.opened()
            relay = Relay(self._stats, up_stats, on_done=lambda: ctx.connections.discard(client), origin=self)  # type: ignore[arg-type]
            relay.start(client, upstream, a_pending=pending, a_eof=eof, b_pending=bytes(up.pending), b_eof=up.eof)

        pending, self.pending = bytes(self.pending), bytearray()
        # Route-level policies are the destination's to enforce: an HTTP port's requests are parsed
        # and authorized one by one (agent/inbound_http.py).
        assert self._stats is not None
        if not inbound_http.hand_over(ctx, client, pod, req.dst_port, self.authz_subject, self._stats, pending, self.eof, False, upstream, up, relay):
            relay(pending, self.eof)
