"""mTLS HTTP/2 tunnels between two real NodeProxy instances on loopback (127.0.0.0/8, ephemeral
ports, uvloop), with certificates from the real CA through the agents' CertStores.

node1 = 127.0.0.1 proxy, client pod 127.0.1.20; node2's echo pod 127.0.2.11. A socket tap sits
between node1 and node2's tunnel port to look at the bytes on the "wire".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from nodemesh import spiffe, tlsctx
from nodemesh.agent.hbone import H2Mux
from nodemesh.agent.identity_client import AgentIdentity
from nodemesh.agent.proxy import NodeProxy
from nodemesh.agent.tunnel import sni_name
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

from .loopback import run

pytestmark = pytest.mark.timeout(20)
TD = "cluster.local"
CLIENT_IP, ECHO2_IP = "127.0.1.20", "127.0.2.11"
VIP = "10.96.0.30"
CLIENT_ID = spiffe.workload_id(TD, "default", "client")
ECHO_ID = spiffe.workload_id(TD, "default", "echo")


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write(b"<eof>")
        self.transport.close()
        return True


class Tap:
    """A TCP forwarder recording the bytes node1 sends towards node2's tunnel port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.seen = bytearray()
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        ur, uw = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if record:
                        self.seen += data
                    dst.write(data)
                    await dst.drain()
            dst.close()
        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False), return_exceptions=True)


def sign_into(ca: CertificateAuthority, ident: AgentIdentity, who: str) -> None:
    csr = ident.store.request(who)
    from nodemesh.controller.csr_policy import check_csr
    grant = check_csr(csr, ident.node, TD, {who})
    ident.store.accept(who, [c.public_bytes(serialization.Encoding.PEM).decode() for c in ca.sign(grant.public_key, grant.identity)])


@dataclass
class Mesh:
    ca: CertificateAuthority
    node1: NodeProxy
    node2: NodeProxy
    id1: AgentIdentity
    id2: AgentIdentity
    tap: Tap
    orig: dict[tuple[str, int], tuple[str, int]]
    tunnel_ports: dict[str, int] = field(default_factory=dict)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((CLIENT_IP, 0))
        self.orig[sock.getsockname()] = (VIP, 80)
        await loop.sock_connect(sock, self.node1.addresses.outbound)
        return await asyncio.open_connection(sock=sock)

    async def echo(self, payload: bytes) -> bytes:
        r, w = await self.connect()
        w.write(payload)
        w.write_eof()
        data = await r.read(-1)
        w.close()
        return data


@contextlib.asynccontextmanager
async def mesh(lifetime: float = 60, provision: bool = True, tap: bool = True) -> AsyncIterator[Mesh]:
    loop = asyncio.get_running_loop()
    anchor = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), lifetime)
    echo_srv = await loop.create_server(Echo, ECHO2_IP, 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    ids = {n: AgentIdentity(n, "unused", ca.bundle_pem(), TD) for n in ("node1", "node2")}
    proxies = {n: NodeProxy(n, original_dst=lambda ip, port: orig.get((ip, port)), connect_timeout=1.0) for n in ids}
    ports: dict[str, int] = {}
    for n, p in proxies.items():
        ports[n] = (await p.enable_mtls(ids[n], ("127.0.0.1", 0), tunnel_addr=lambda node, inbound: ("127.0.0.1", ports[f"tap-{node}"])))[1]
        await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    t = Tap(("127.0.0.1", ports["node2"]))
    ports["tap-node2"] = await t.start() if tap else ports["node2"]
    ports["tap-node1"] = ports["node1"]
    client = WorkloadPod("default", "client-1", CLIENT_IP, "node1", "client", CLIENT_ID)
    echo2 = WorkloadPod("default", "echo-2", ECHO2_IP, "node2", "echo", ECHO_ID)
    ep = Endpoint("default", "echo-2", ECHO2_IP, echo_port, "node2", ECHO_ID)
    for n, p in proxies.items():
        cfg = NodeConfig(1, n, nodes=(NodeInfo("node1", "127.0.0.1", "127.0.1.0/24", 1), NodeInfo("node2", "127.0.0.1", "127.0.2.0/24", 1)),
                         services=(ServiceView("default", "echo-remote", VIP, (ServicePortView(80, "tcp", "TCP", (ep,)),)),),
                         pods=(client, echo2))
        p.apply_config(cfg)
        ids[n].set_config(cfg)
    if provision:
        sign_into(ca, ids["node1"], CLIENT_ID)
        sign_into(ca, ids["node2"], ECHO_ID)
    m = Mesh(ca, proxies["node1"], proxies["node2"], ids["node1"], ids["node2"], t, orig, ports)
    try:
        yield m
    finally:
        for p in proxies.values():
            await p.stop()
        echo_srv.close()
        if tap:
            t.server.close()


def series(proxy: NodeProxy, direction: str, peer: str) -> dict[str, str]:
    for labels, s in proxy.metrics.tcp_series():
        if labels["direction"] == direction and labels["peer"] == peer and s.open_total:
            return labels
    raise AssertionError(f"no {direction}/{peer} series")


def test_cross_node_bytes_are_tls_and_identities_are_in_metrics() -> None:
    secret = b"\x00very-secret-plaintext bytes of an opaque protocol"

    async def body() -> None:
        async with mesh() as m:
            assert await m.echo(secret) == secret + b"<eof>"  # half-close crosses the tunnel
            wire = bytes(m.tap.seen)
            assert wire[:1] == b"\x16" and wire[1:3] == b"\x03\x01"  # a TLS record: ClientHello
            assert b"\x17\x03\x03" in wire  # application_data records (TLS 1.3)
            assert secret not in wire and b"very-secret" not in wire and b"CONNECT" not in wire
            inbound = series(m.node2, "inbound", "src")
            assert inbound["tls"] == "true" and inbound["client_id"] == CLIENT_ID
            outbound = series(m.node1, "outbound", "dst")
            assert outbound["tls"] == "true" and outbound["server_id"] == ECHO_ID
            text = m.node2.metrics.render().decode()
            assert f'client_id="{CLIENT_ID}"' in text and 'tls="true"' in text
    run(body)


def test_many_connections_share_one_handshake() -> None:
    async def body() -> None:
        async with mesh() as m:
            for i in range(30):
                assert await m.echo(b"x%d" % i) == b"x%d<eof>" % i
            assert m.node1.tunnels.connections_opened == 1 and m.tap.connections == 1
            rs = await asyncio.gather(*(m.echo(b"c%d" % i) for i in range(20)))  # concurrent streams
            assert rs == [b"c%d<eof>" % i for i in range(20)]
            assert m.node1.tunnels.connections_opened == 1
    run(body)


def test_large_transfer_respects_flow_control() -> None:
    async def body() -> None:
        async with mesh(tap=False) as m:
            blob = bytes(range(256)) * (8 * 1024)  # 2 MiB > stream window and relay high water
            assert await m.echo(blob) == blob + b"<eof>"
    run(body)


def test_no_certificate_fails_closed_never_plaintext() -> None:
    async def body() -> None:
        async with mesh(provision=False) as m:
            r, w = await m.connect()
            w.write(b"hello")
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                data = await r.read(-1)
                if not data:
                    raise ConnectionError("closed")
            assert m.node1.metrics.errors("outbound", "no_certificate") == 1
            assert m.tap.connections == 0  # nothing left the node at all
            assert not [labels for labels, s in m.node2.metrics.tcp_series() if s.open_total]
    run(body)


def test_renewed_source_cert_new_handshake_old_stream_survives() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect()
            w.write(b"one")
            assert await r.readexactly(3) == b"one"
            gen = m.id1.credential(CLIENT_ID).generation
            sign_into(m.ca, m.id1, CLIENT_ID)  # renewal
            assert m.id1.credential(CLIENT_ID).generation == gen + 1
            assert await m.echo(b"new") == b"new<eof>"
            assert m.node1.tunnels.connections_opened == 2  # new certificate -> new handshake
            w.write(b"two")  # the long-lived stream on the old connection still works
            assert await r.readexactly(3) == b"two"
            w.write_eof()
            assert await r.read(-1) == b"<eof>"
    run(body)


def test_server_with_the_wrong_identity_is_refused() -> None:
    """A TLS server with a valid mesh certificate for another workload is not the destination."""
    async def body() -> None:
        async with mesh(tap=False) as m:
            impostor = AgentIdentity("node2", "x", m.ca.bundle_pem(), TD)
            other = spiffe.workload_id(TD, "default", "impostor")
            sign_into(m.ca, impostor, other)
            cred = impostor.credential(other)
            ctx = tlsctx.server_context(m.ca.bundle_pem(), cred.chain_pem(), cred.key_pem())
            srv = await asyncio.get_running_loop().create_server(lambda: H2Mux(client=False), "127.0.0.1", 0, ssl=ctx)
            m.tunnel_ports["tap-node2"] = srv.sockets[0].getsockname()[1]
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                r, w = await m.connect()
                if not await r.read(-1):
                    raise ConnectionError("closed")
            assert m.node1.metrics.errors("outbound", "tls_identity") == 1
            srv.close()
    run(body)


async def _raw_tunnel(m: Mesh, ctx: Any, sni: str) -> H2Mux:
    _, mux = await asyncio.get_running_loop().create_connection(lambda: H2Mux(client=True), "127.0.0.1", m.tunnel_ports["node2"], ssl=ctx, server_hostname=sni)
    return mux


@pytest.mark.parametrize("case", ["untrusted_ca", "expired_leaf", "wrong_trust_domain", "unknown_identity", "no_client_cert", "unknown_sni"])
def test_inbound_refuses_bad_clients(case: str) -> None:
    async def body() -> None:
        async with mesh(tap=False) as m:
            m.node2.tunnel_server.handshake_timeout = 0.3
            bundle = m.ca.bundle_pem()
            anchor = new_trust_anchor(TD)
            if case == "untrusted_ca":
                ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 60)
            elif case == "expired_leaf":
                ca = CertificateAuthority(TD, m.ca.anchors, m.ca.issuer, 60, clock=lambda: time.time() - 3600)
            else:
                ca = m.ca
            who = {"unknown_identity": spiffe.workload_id(TD, "default", "stranger"),
                   "wrong_trust_domain": "spiffe://evil.local/ns/default/sa/client"}.get(case, CLIENT_ID)
            key_owner = AgentIdentity("node1", "x", bundle, TD)
            key_owner.store.request(who)  # just for a fresh P-256 key
            key = key_owner.store.pending[who].key
            if case == "wrong_trust_domain":
                ca.trust_domain = "evil.local"  # the same anchor signing another trust domain's ID
            chain = ca.sign(key.public_key(), who)
            ca.trust_domain = TD
            chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            ctx = tlsctx.client_context(bundle) if case == "no_client_cert" else tlsctx.client_context(bundle, chain_pem, key_pem)
            sni = "nobody.default.sa.cluster.local" if case == "unknown_sni" else sni_name(ECHO_ID)
            refused = False
            try:
                mux = await _raw_tunnel(m, ctx, sni)
                st = await mux.open(f"{ECHO2_IP}:1", None, 1.0)
                del st
            except Exception:  # handshake alert, reset or closed tunnel: refused either way
                refused = True
            assert refused
            assert not [labels for labels, s in m.node2.metrics.tcp_series() if s.open_total and labels["peer"] == "dst"]
            if case in ("wrong_trust_domain", "unknown_identity"):
                # chain verified by OpenSSL, identity refused by us: counted
                await asyncio.sleep(0.05)
                assert m.node2.metrics.errors("inbound", "tls_identity") == 1
            else:  # OpenSSL refused the handshake itself: counted once it is clear it never completes
                await asyncio.sleep(0.5)
                assert m.node2.metrics.errors("inbound", "tls_handshake") == 1
    run(body)


def test_connect_to_a_pod_not_on_the_node_is_refused() -> None:
    async def body() -> None:
        async with mesh(tap=False) as m:
            cred = m.id1.credential(CLIENT_ID)
            ctx = tlsctx.client_context(m.ca.bundle_pem(), cred.chain_pem(), cred.key_pem())
            mux = await _raw_tunnel(m, ctx, sni_name(ECHO_ID))
            from nodemesh.agent.hbone import TunnelError
            with pytest.raises(TunnelError, match="404"):
                await mux.open(f"{CLIENT_IP}:80", None, 1.0)  # client-1 lives on node1: not an open relay
            with pytest.raises(TunnelError, match="400"):
                await mux.open("not-an-ip:80", None, 1.0)
            assert m.node2.metrics.errors("inbound", "unknown_pod") == 1
    run(body)
