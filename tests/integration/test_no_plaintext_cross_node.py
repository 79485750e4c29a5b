"""Fail closed (issue 4): with mTLS on, a meshed destination on another node is never reached in
plaintext. Every outbound data path (L4 relay, the HTTP/1 proxy's pool, the h2/gRPC proxy's pool)
goes through the tunnel pool; the destination node's plaintext inbound port (4143) is a trap here
that records any connection, and must record none while every request succeeds over 15008.

Two real NodeProxy instances on loopback with certificates from the real CA (the harness of
test_mtls_tunnel.py, with the destination node's *plaintext* inbound port advertised in the config).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from nodemesh.agent.identity_client import AgentIdentity
from nodemesh.agent.proxy import NodeProxy
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod
from nodemesh.sample_h2 import Behaviour, H2Client, grpc_frame, serve

from .test_mtls_tunnel import CLIENT_ID, CLIENT_IP, ECHO2_IP, ECHO_ID, TD, VIP, Echo, run, sign_into

pytestmark = pytest.mark.timeout(20)


class Http1(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


class Trap(asyncio.Protocol):
    """node2's plaintext inbound port as node1 sees it in the config: any connection is a leak."""

    accepted = 0

    def connection_made(self, transport: Any) -> None:
        Trap.accepted += 1
        transport.abort()


@dataclass
class Pair:
    node1: NodeProxy
    orig: dict[tuple[str, int], tuple[str, int]]

    def bound(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((CLIENT_IP, 0))
        self.orig[sock.getsockname()] = (VIP, 80)
        return sock

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self.bound()
        await asyncio.get_running_loop().sock_connect(sock, self.node1.addresses.outbound)
        return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def pair(server: str) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    anchor = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 60)
    if server == "h2":
        srv = await serve(ECHO2_IP, 0, Behaviour())
    else:
        srv = await loop.create_server(Http1 if server == "http1" else Echo, ECHO2_IP, 0)
    port = srv.sockets[0].getsockname()[1]
    Trap.accepted = 0
    trap = await loop.create_server(Trap, "127.0.0.1", 0)
    trap_port = trap.sockets[0].getsockname()[1]
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    ids = {n: AgentIdentity(n, "unused", ca.bundle_pem(), TD) for n in ("node1", "node2")}
    proxies = {n: NodeProxy(n, original_dst=lambda ip, p: orig.get((ip, p)), connect_timeout=1.0) for n in ids}
    tunnel: dict[str, int] = {}
    for n, p in proxies.items():
        tunnel[n] = (await p.enable_mtls(ids[n], ("127.0.0.1", 0), tunnel_addr=lambda node, inbound: ("127.0.0.1", tunnel[node])))[1]
        await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    client = WorkloadPod("default", "client-1", CLIENT_IP, "node1", "client", CLIENT_ID)
    echo2 = WorkloadPod("default", "echo-2", ECHO2_IP, "node2", "echo", ECHO_ID)
    ep = Endpoint("default", "echo-2", ECHO2_IP, port, "node2", ECHO_ID)
    for n, p in proxies.items():
        cfg = NodeConfig(1, n, nodes=(NodeInfo("node1", "127.0.0.1", "127.0.1.0/24", trap_port),
                                      NodeInfo("node2", "127.0.0.1", "127.0.2.0/24", trap_port)),
                         services=(ServiceView("default", "echo", VIP, (ServicePortView(80, "http", "TCP", (ep,)),)),),
                         pods=(client, echo2))
        p.apply_config(cfg)
        ids[n].set_config(cfg)
    sign_into(ca, ids["node1"], CLIENT_ID)
    sign_into(ca, ids["node2"], ECHO_ID)
    try:
        yield Pair(proxies["node1"], orig)
    finally:
        for p in proxies.values():
            await p.stop()
        srv.close()
        trap.close()


def tls_out(p: NodeProxy) -> list[dict[str, str]]:
    return [labels for labels, s in p.metrics.tcp_series() if labels["direction"] == "outbound" and labels["peer"] == "dst" and s.open_total]


def test_l4_goes_through_the_tunnel_only() -> None:
    async def body() -> None:
        async with pair("l4") as m:
            for i in range(3):
                r, w = await m.connect()
                w.write(b"\x00opaque %d" % i)
                assert await r.readexactly(9) == b"\x00opaque %d" % i
                w.close()
            assert Trap.accepted == 0
            assert {x["tls"] for x in tls_out(m.node1)} == {"true"}
    run(body)


def test_http1_pool_goes_through_the_tunnel_only() -> None:
    async def body() -> None:
        async with pair("http1") as m:
            r, w = await m.connect()
            for _ in range(3):
                w.write(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
                head = await r.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and await r.readexactly(5) == b"hello"
            w.close()
            assert Trap.accepted == 0
            assert tls_out(m.node1) and {x["tls"] for x in tls_out(m.node1)} == {"true"}
    run(body)


def test_h2_pool_goes_through_the_tunnel_only() -> None:
    async def body() -> None:
        async with pair("h2") as m:
            sock = m.bound()
            await asyncio.get_running_loop().sock_connect(sock, m.node1.addresses.outbound)
            client = await H2Client.connect("", 0, sock=sock)
            for _ in range(3):
                resp = await client.call("/nodemesh.Echo/Who", grpc_frame(b"{}"), authority="echo")
                assert resp.status == 200 and resp.grpc_status == 0
            assert Trap.accepted == 0
            assert tls_out(m.node1) and {x["tls"] for x in tls_out(m.node1)} == {"true"}
    run(body)
