"""mTLS between node proxies: TLS 1.3 contexts from the agent's certificates, the outbound tunnel
pool, and the inbound tunnel listener (15008). Framing is agent/hbone.py.

Outbound: a remote Plan opens a CONNECT stream on the pooled connection for
(source identity, its certificate generation, destination node, destination identity); the TLS
client certificate is the *source workload's*, SNI names the destination identity, and the
server's verified SPIFFE ID must be exactly the destination's (from the controller's config).
A renewed source certificate starts a new connection (new handshakes use new certificates); the
old one finishes its streams and goes. No certificate yet: wait (bounded), then fail - never
plaintext.

Inbound: the SNI callback presents the named local workload's current certificate; the client's
chain is verified by OpenSSL against the trust bundle, then its SPIFFE ID must be in our trust
domain and known to the config. Each CONNECT must name a meshed pod on this node. A stream to an
HTTP port (agent/inbound_http.py) is then served request by request, so the destination enforces
its route-level policies itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from nodemesh import spiffe, tlsctx
from nodemesh.agent import inbound_http
from nodemesh.agent.decide import Plan
from nodemesh.agent.handshake import HandshakeError
from nodemesh.agent.handshake import _parse_authority as parse_authority  # same rules as the plaintext tunnel
from nodemesh.agent.hbone import H2Mux, H2Stream, TunnelError
from nodemesh.agent.identity import Credential
from nodemesh.agent.identity_client import AgentIdentity, verify_peer
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.outbound import DialError, ListenerContext, dial
from nodemesh.agent.relay import Relay
from nodemesh.nodeconfig import TUNNEL_PORT

log = logging.getLogger(__name__)

CERT_POLL = 0.05
HANDSHAKE_TIMEOUT = 10.0  # an accepted tunnel connection not through TLS by then counts as failed


def sni_name(identity: str) -> str:
    """A DNS-shaped SNI for a SPIFFE ID (SNI cannot carry a URI): <sa>.<ns>.sa.<td> for workloads,
    <node>.node.<td> for nodes."""
    sid = spiffe.parse(identity)
    wl = sid.workload
    if wl is not None:
        return f"{wl[1]}.{wl[0]}.sa.{sid.trust_domain}"
    node = spiffe.node_of(sid)
    if node is not None:
        return f"{node}.node.{sid.trust_domain}"
    raise spiffe.IdentityError(f"{identity} has no SNI form")


class MeshTls:
    """TLS contexts built from the current credentials, cached by certificate and bundle generation."""

    def __init__(self, identity: AgentIdentity) -> None:
        self.identity = identity
        self._client: dict[str, tuple[tuple[int, int], ssl.SSLContext]] = {}
        self._server: dict[str, tuple[tuple[int, int], ssl.SSLContext]] = {}
        self.handshakes = 0  # completed, both directions (for the bench and /metrics)

    def _cached(self, cache: dict[str, Any], cred: Credential, make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        gen = (cred.generation, self.identity.store.bundle_generation)
        hit = cache.get(cred.identity)
        if hit is not None and hit[0] == gen:
            return hit[1]
        ctx = make()
        cache[cred.identity] = (gen, ctx)
        return ctx

    def client(self, cred: Credential) -> ssl.SSLContext:
        bundle = self.identity.store.bundle_pem
        return self._cached(self._client, cred, lambda: tlsctx.client_context(bundle, cred.chain_pem(), cred.key_pem()))

    def server(self, cred: Credential) -> ssl.SSLContext:
        bundle = self.identity.store.bundle_pem
        return self._cached(self._server, cred, lambda: tlsctx.server_context(bundle, cred.chain_pem(), cred.key_pem()))

    def listener_context(self) -> ssl.SSLContext:
        """The context the listener starts with: no certificate of its own; the SNI callback swaps
        in the named identity's context (unknown name: handshake refused)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            cred = self._by_sni(name)
            if cred is None:
                log.info("tunnel handshake for unknown server name %r refused", name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self.server(cred)
            return None

        ctx.sni_callback = pick
        return ctx

    def _by_sni(self, name: str | None) -> Credential | None:
        if not name:
            return None
        for ident in self.identity.wanted():
            try:
                if sni_name(ident) == name:
                    return self.identity.credential(ident)
            except spiffe.IdentityError:
                continue
        return None


TunnelAddr = Callable[[str, tuple[str, int]], tuple[str, int]]


def default_tunnel_addr(node: str, inbound: tuple[str, int]) -> tuple[str, int]:
    return inbound[0], TUNNEL_PORT


class TunnelPool:
    """Outbound: one mTLS HTTP/2 connection per key, shared by all streams with that key."""

    def __init__(self, identity: AgentIdentity, tls: MeshTls, tunnel_addr: TunnelAddr = default_tunnel_addr) -> None:
        self.identity = identity
        self.tls = tls
        self.tunnel_addr = tunnel_addr
        self._conns: dict[tuple[Any, ...], asyncio.Future[H2Mux]] = {}
        self.connections_opened = 0

    async def _credential(self, ident: str, deadline: float) -> Credential:
        loop = asyncio.get_running_loop()
        while True:
            cred = self.identity.credential(ident)
            if cred is not None:
                return cred
            if loop.time() >= deadline:
                raise DialError("no_certificate", f"no certificate for {ident} yet (waited for the controller); refusing to send it in plaintext")
            await asyncio.sleep(CERT_POLL)

    async def dial(self, plan: Plan, timeout: float) -> tuple[H2Stream, H2Stream]:
        """Open a CONNECT stream for a remote plan. Raises DialError (metric label + message)."""
        assert plan.target is not None and plan.connect is not None and plan.tunnel is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        src = plan.src_identity or self.identity.node_identity
        cred = await self._credential(src, deadline)
        dst_id = plan.target.identity
        addr = self.tunnel_addr(plan.target.node, plan.connect)
        key = (src, cred.generation, self.identity.store.bundle_generation, plan.target.node, addr, dst_id)
        mux = await self._mux(key, cred, addr, dst_id, deadline)
        try:
            st = await mux.open(plan.tunnel.authority, plan.tunnel.dst_pod, max(0.01, deadline - loop.time()))
        except TunnelError as exc:
            raise DialError(exc.error, str(exc), exc.status or 502) from None
        return st, st

    async def _mux(self, key: tuple[Any, ...], cred: Credential, addr: tuple[str, int], dst_id: str, deadline: float) -> H2Mux:
        fut = self._conns.get(key)
        if fut is not None:
            if not fut.done():
                return await asyncio.shield(fut)
            if fut.exception() is None and fut.result().usable:
                return fut.result()
        self._gc(key)
        fut = asyncio.get_running_loop().create_future()
        self._conns[key] = fut
        try:
            mux = await self._connect(cred, addr, dst_id, deadline)
        except BaseException as exc:
            self._conns.pop(key, None)
            fut.set_exception(exc if isinstance(exc, Exception) else DialError("connect_failed", "cancelled"))
            fut.exception()  # retrieved: waiters get it, no "never retrieved" warning
            raise
        mux.on_lost = lambda m, e, key=key: self._lost(key, m)
        fut.set_result(mux)
        return mux

    def _gc(self, key: tuple[Any, ...]) -> None:
        """Drop pooled connections of older certificate generations for the same destination: they
        finish their streams (GOAWAY) and close; new streams use new certificates."""
        for k in [k for k in self._conns if k[0] == key[0] and k[3:] == key[3:] and k != key]:
            fut = self._conns.pop(k)
            if fut.done() and fut.exception() is None:
                m = fut.result()
                m.goaway = True
                if not m.streams:
                    m.close()

    def _lost(self, key: tuple[Any, ...], mux: H2Mux) -> None:
        fut = self._conns.get(key)
        if fut is not None and fut.done() and fut.exception() is None and fut.result() is mux:
            del self._conns[key]

    async def _connect(self, cred: Credential, addr: tuple[str, int], dst_id: str, deadline: float) -> H2Mux:
        loop = asyncio.get_running_loop()
        ctx = self.tls.client(cred)
        try:
            async with asyncio.timeout(max(0.01, deadline - loop.time())):
                transport, mux = await loop.create_connection(lambda: H2Mux(client=True), addr[0], addr[1], ssl=ctx,
                                                              server_hostname=sni_name(dst_id))
        except TimeoutError:
            raise DialError("connect_timeout", f"no TLS tunnel to {addr[0]}:{addr[1]} within the connect timeout", 504) from None
        except ssl.SSLError as exc:
            raise DialError("tls_handshake", f"TLS handshake with {addr[0]}:{addr[1]} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise DialError("connect_failed", f"cannot connect to the tunnel at {addr[0]}:{addr[1]}: {exc.strerror or exc}") from None
        try:
            verify_peer(transport, dst_id, self.identity.trust_domain)
        except spiffe.IdentityError as exc:
            transport.abort()
            raise DialError("tls_identity", f"tunnel peer at {addr[0]}:{addr[1]} is not the destination: {exc}") from None
        mux.peer_identity = dst_id
        self.tls.handshakes += 1
        self.connections_opened += 1
        return mux

    def close(self) -> None:
        for fut in self._conns.values():
            if fut.done() and fut.exception() is None:
                fut.result().close()
        self._conns.clear()


class TunnelServer:
    """Inbound 15008: accepts mTLS HTTP/2 connections and serves their CONNECT streams."""

    def __init__(self, ctx: ListenerContext, identity: AgentIdentity, tls: MeshTls) -> None:
        self.ctx = ctx
        self.identity = identity
        self.tls = tls
        self.muxes: set[H2Mux] = set()
        self._server: asyncio.AbstractServer | None = None
        self.refused_identities = 0
        self.failed_handshakes = 0
        self.handshake_timeout = HANDSHAKE_TIMEOUT

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host, port, ssl=self.tls.listener_context(), reuse_address=True, backlog=1024)
        return self._server.sockets[0].getsockname()[:2]

    def _factory(self) -> H2Mux:
        mux = H2Mux(client=False, on_request=self._on_request, on_ready=self._on_ready, on_lost=lambda m, e: self.muxes.discard(m))
        # asyncio tells the protocol nothing when a TLS handshake fails (untrusted or expired chain,
        # no client certificate, unknown SNI): a connection that never completes it is counted here.
        asyncio.get_running_loop().call_later(self.handshake_timeout, self._check_handshake, mux)
        return mux

    def _check_handshake(self, mux: H2Mux) -> None:
        if mux.transport is None:
            self.failed_handshakes += 1
            self.ctx.metrics.error("inbound", "tls_handshake")

    def _known_identities(self) -> set[str]:
        view = self.ctx.view()
        ids = {p.identity for p in view._pods.values()}  # noqa: SLF001  (every meshed pod's identity)
        return ids

    def _on_ready(self, mux: H2Mux) -> None:
        assert mux.transport is not None
        try:
            sid = spiffe.der_identity(mux.transport.get_extra_info("ssl_object").getpeercert(binary_form=True), self.identity.trust_domain)
            if str(sid) not in self._known_identities():
                raise spiffe.IdentityError(f"client identity {sid} is not a workload in the current config", "unknown_identity")
        except spiffe.IdentityError as exc:
            self.refused_identities += 1
            self.ctx.metrics.error("inbound", "tls_identity")
            log.warning("tunnel from %s refused: %s", mux.transport.get_extra_info("peername"), exc)
            mux.transport.abort()
            mux.closed = True
            return
        mux.peer_identity = str(sid)
        self.tls.handshakes += 1
        self.muxes.add(mux)

    def _on_request(self, st: H2Stream, authority: str, headers: dict[str, str]) -> None:
        if st.mux.peer_identity is None:
            st.mux.respond(st, 403, "unauthenticated")
            return
        asyncio.get_running_loop().create_task(self._serve(st, authority, headers.get("x-nodemesh-dst-pod")))

    async def _serve(self, st: H2Stream, authority: str, dst_pod: str | None) -> None:
        ctx, mux = self.ctx, st.mux
        client_id = mux.peer_identity or ""
        try:
            ip, port = parse_authority(authority)
        except HandshakeError as exc:
            self._refuse(st, 400, str(exc), "handshake_error", "", client_id)
            return
        pod = ctx.view().local_pod(ip)
        if pod is None or (dst_pod is not None and dst_pod != f"{pod.namespace}/{pod.name}"):
            self._refuse(st, 404, f"{dst_pod or ip} is not a meshed pod on this node", "unknown_pod", "", client_id)
            return
        subject = None
        if ctx.authz is not None:
            # Same policy check as the plaintext inbound path, with the *verified* client identity.
            from nodemesh.agent.authorizer import Subject
            from nodemesh.authz import ClientInfo

            peer = mux.transport.get_extra_info("peername") if mux.transport is not None else None
            subject = Subject(ClientInfo(client_id, peer[0] if peer else "", tls=True), pod.namespace, pod.name, pod.ip, port)
            subject = inbound_http.gate(ctx, pod, port, subject)  # HTTP ports: route policies are decided per request
            decision = ctx.authz.check(subject)
            if not decision.allowed:
                self._refuse(st, 403, decision.reason, "unauthorized", pod.namespace, client_id)
                return
            st.authz_subject = subject  # type: ignore[attr-defined]  # re-checked on policy change (NodeProxy.apply_config)
        stats = ctx.metrics.tcp("inbound", "src", pod.namespace, "", tls=True, client_id=client_id)
        stats.opened()
        try:
            upstream, up = await dial((ip, port), None, ctx.connect_timeout)
        except DialError as exc:
            stats.closed()
            ctx.metrics.error("inbound", exc.error)
            mux.respond(st, exc.status, str(exc))
            return
        if st.lost or up.lost:
            upstream.close()
            stats.closed()
            if not st.lost:
                mux.respond(st, 502, "pod closed the connection")
            return
        mux.respond(st, 200)
        pending, eof = bytes(st.pending), st.eof
        st.pending.clear()

        def relay(pending: bytes, eof: bool, subject: Any = None) -> None:
            if subject is not None:
                st.authz_subject = subject  # type: ignore[attr-defined]
            up_stats = ctx.metrics.tcp("inbound", "dst", pod.namespace, "")
            up_stats.opened()
            Relay(stats, up_stats, origin=st).start(st, upstream, a_pending=pending, a_eof=eof, b_pending=bytes(up.pending), b_eof=up.eof)  # type: ignore[arg-type]

        # Route-level policies are the destination's to enforce: an HTTP port's requests are parsed
        # and authorized one by one here (agent/inbound_http.py).
        if not inbound_http.hand_over(ctx, st, pod, port, subject, stats, pending, eof, True, upstream, up, relay):
            relay(pending, eof)

    def _refuse(self, st: H2Stream, status: int, reason: str, error: str, ns: str, client_id: str) -> None:
        stats = self.ctx.metrics.tcp("inbound", "src", ns, "", tls=True, client_id=client_id)
        stats.opened()
        stats.closed()
        self.ctx.metrics.error("inbound", error)
        log.info("tunnel stream from %s refused (%d): %s", client_id, status, reason)
        st.mux.respond(st, status, reason)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for m in list(self.muxes):
            m.close()
            if m.transport is not None:
                m.transport.abort()
