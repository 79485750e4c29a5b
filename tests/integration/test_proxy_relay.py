"""Node proxy data path on real sockets (127.0.0.0/8, ephemeral ports, uvloop), BPF skipped.

Two NodeProxy instances play node1 and node2. The BPF original-destination lookup is stubbed with a
dict filled by the test client before it connects (test seam only; the redirect itself is tested
end to end on the lab). Loopback aliases give pods distinct IPs: node1 pods 127.0.1.x, node2 pods
127.0.2.x, both proxies on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from nodemesh import sample_server
from nodemesh.agent.handshake import ResponseParser, TunnelRequest, encode_request
from nodemesh.agent.proxy import NodeProxy
from nodemesh.agent.relay import HIGH_WATER
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

from . import loopback

pytestmark = pytest.mark.timeout(10)
run = functools.partial(loopback.run, budget=5.0)

CLIENT_IP = "127.0.1.20"  # pod client-1 on node1
ECHO_IP = "127.0.1.10"  # pod echo-1 on node1
HTTP_IP = "127.0.2.10"  # pod web-2 on node2
REMOTE_ECHO_IP = "127.0.2.11"  # pod echo-2 on node2
DEAD_IP = "127.0.1.30"  # pod dead-1 on node1: nothing listens
ECHO_VIP, WEB_VIP, REMOTE_ECHO_VIP, DEAD_VIP = "10.96.0.10", "10.96.0.20", "10.96.0.30", "10.96.0.40"


# ---- backends -------------------------------------------------------------------------------------


class Echo(asyncio.Protocol):
    """Echoes bytes; on the client's FIN answers b"<eof>" and only then closes, which proves the
    reverse direction stayed open through the proxies. `Echo.paused` holds reading (flow control)."""

    instances: list[Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.received = 0
        Echo.instances.append(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write(b"<eof>")
        self.transport.close()
        return True


def free_port(ip: str) -> int:
    """A port nobody listens on (connects get RST)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def pod(ns: str, name: str, ip: str, node: str) -> WorkloadPod:
    sa = name.split("-")[0]
    return WorkloadPod(ns, name, ip, node, sa, f"spiffe://cluster.local/ns/{ns}/sa/{sa}")


def svc(name: str, vip: str, p: WorkloadPod, port: int) -> ServiceView:
    ep = Endpoint(p.namespace, p.name, p.ip, port, p.node, p.identity)
    return ServiceView("default", name, vip, (ServicePortView(80, "tcp", "TCP", (ep,)),))


@dataclass
class Mesh:
    node1: NodeProxy
    node2: NodeProxy
    orig: dict[tuple[str, int], tuple[str, int]]
    meshed: dict[str, set[tuple[str, int]]]
    ports: dict[str, int] = field(default_factory=dict)

    async def connect(
        self, dst: tuple[str, int] | None, src_ip: str = CLIENT_IP, rcvbuf: int = 0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """What a pod's connect() to `dst` becomes after connect4: a connection to node1's outbound
        listener from the pod's own address, with the original destination recorded for lookup."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((src_ip, 0))
        if dst is not None:
            self.orig[sock.getsockname()] = dst
        await loop.sock_connect(sock, self.node1.addresses.outbound)
        return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    Echo.instances = []
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(Echo, ECHO_IP, 0),
        await loop.create_server(Echo, REMOTE_ECHO_IP, 0),
        await sample_server.serve(HTTP_IP, 0, sample_server.Behaviour(), sample_server.Identity("web-2", "default", "node2")),
    ]
    echo_port, remote_echo_port, http_port = (s.sockets[0].getsockname()[1] for s in servers)
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    meshed: dict[str, set[tuple[str, int]]] = {}
    proxies = {
        n: NodeProxy(n, original_dst=lambda ip, port: orig.get((ip, port)), set_meshed=lambda d, n=n: meshed.__setitem__(n, set(d)), connect_timeout=1.0)
        for n in ("node1", "node2")
    }
    for p in proxies.values():
        await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    client = pod("default", "client-1", CLIENT_IP, "node1")
    echo1 = pod("default", "echo-1", ECHO_IP, "node1")
    dead = pod("default", "dead-1", DEAD_IP, "node1")
    web2 = pod("default", "web-2", HTTP_IP, "node2")
    echo2 = pod("default", "echo-2", REMOTE_ECHO_IP, "node2")
    for name, p in proxies.items():
        p.apply_config(
            NodeConfig(
                version=1,
                node=name,
                nodes=tuple(
                    NodeInfo(n, "127.0.0.1", f"127.0.{i}.0/24", q.addresses.inbound[1]) for i, (n, q) in enumerate(proxies.items(), start=1)
                ),
                services=(
                    svc("echo", ECHO_VIP, echo1, echo_port),
                    svc("web", WEB_VIP, web2, http_port),
                    svc("echo-remote", REMOTE_ECHO_VIP, echo2, remote_echo_port),
                    svc("dead", DEAD_VIP, dead, free_port(DEAD_IP)),
                ),
                pods=(client, echo1, dead, web2, echo2),
            )
        )
    m = Mesh(proxies["node1"], proxies["node2"], orig, meshed, {"echo": echo_port, "http": http_port})
    try:
        yield m
    finally:
        for p in proxies.values():
            await p.stop()
        for s in servers:
            s.close()


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, dict]:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: web\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return status, json.loads(await reader.readexactly(length))


def series(proxy: NodeProxy, direction: str, peer: str, service: str = "") -> dict[str, int]:
    for labels, s in proxy.metrics.tcp_series():
        if (labels["direction"], labels["peer"]) == (direction, peer) and labels["dst_service"] == service:
            return {"open": s.open_total, "close": s.close_total, "conns": s.open_connections, "read": s.read_bytes, "write": s.write_bytes}
    raise AssertionError(f"no {direction}/{peer}/{service!r} series in {list(proxy.metrics.tcp_series())}")


async def until(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


# ---- tests ----------------------------------------------------------------------------------------


def test_apply_config_feeds_bpf_the_meshed_destinations() -> None:
    async def body() -> None:
        async with mesh() as m:
            assert (ECHO_VIP, 80) in m.meshed["node1"] and (HTTP_IP, 0) in m.meshed["node1"]
            assert m.meshed["node1"] == set(m.node1.view.meshed_destinations())
            assert m.node1.config_applied and m.node1.listening

    run(body)


def test_local_plan_relays_to_backend() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((ECHO_VIP, 80))
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()

    run(body)


def test_remote_plan_goes_through_both_proxies_with_keepalive_http() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((WEB_VIP, 80))
            for path in ("/a", "/b/c"):
                status, doc = await http_get(r, w, path)
                assert status == 200 and doc == {"pod": "web-2", "namespace": "default", "node": "node2", "path": path, "method": "GET"}
            w.close()
            await until(lambda: series(m.node1, "outbound", "src", "web")["close"] == 1)
            # HTTP/1 is served by the L7 proxy: both requests rode one pooled upstream connection,
            # which stays open (idle in the pool) after the client left.
            assert series(m.node1, "outbound", "dst", "web")["open"] == 1
            assert series(m.node2, "inbound", "dst")["open"] == 1
            assert series(m.node2, "inbound", "src")["close"] == 0

    run(body)


def test_pod_ip_dialed_directly_is_meshed_too() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((HTTP_IP, m.ports["http"]))
            status, doc = await http_get(r, w, "/direct")
            assert status == 200 and doc["pod"] == "web-2"
            w.close()

    run(body)


@pytest.mark.parametrize("vip", [ECHO_VIP, REMOTE_ECHO_VIP], ids=["local", "remote"])
def test_half_close_keeps_the_other_direction_open(vip: str) -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((vip, 80))
            w.write(b"last words")
            w.write_eof()  # our FIN must reach the backend, and its reply must still reach us
            assert await r.read() == b"last words<eof>"
            w.close()

    run(body)


def test_bytes_sent_before_upstream_is_ready_are_not_lost() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((REMOTE_ECHO_VIP, 80))
            payload = bytes(range(256)) * 1024  # 256 KiB written at once, before the tunnel is up
            w.write(payload)
            w.write_eof()
            assert await r.read() == payload + b"<eof>"
            w.close()

    run(body)


@pytest.mark.parametrize("vip", [ECHO_VIP, REMOTE_ECHO_VIP], ids=["local", "remote"])
def test_big_transfer_with_flow_control_and_exact_counters(vip: str) -> None:
    size = 8 * 1024 * 1024

    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((vip, 80), rcvbuf=65536)
            # Phase 1: we do not read. Our small receive buffer fills, then the kernel send buffer of
            # the proxy's socket towards us; from there only the relay's flow control keeps the
            # proxies' user-space buffers bounded (without it they would hold megabytes).
            max_buffered, paused = 0, False

            async def sample() -> None:
                nonlocal max_buffered, paused
                while True:
                    for proxy in (m.node1, m.node2):
                        for t in list(proxy._connections):
                            side = t.get_protocol()
                            if getattr(side, "peer", None) is None:
                                continue
                            for x in (side, side.peer):
                                max_buffered = max(max_buffered, x.transport.get_write_buffer_size())
                                paused |= x.throttled
                    await asyncio.sleep(0.001)

            sampler = asyncio.create_task(sample())
            chunk = b"x" * 65536
            sent = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    while sent < size:
                        w.write(chunk)
                        sent += len(chunk)
                        await w.drain()
            await asyncio.sleep(0.05)
            sampler.cancel()
            assert paused, "the relay never throttled a reader although we read nothing"
            assert max_buffered <= HIGH_WATER + 512 * 1024, f"a relay buffered {max_buffered} bytes"

            # Phase 2: read everything back, finish the transfer, half-close.
            async def reader() -> bytes:
                got = bytearray()
                while data := await r.read(1 << 20):
                    got += data
                return bytes(got)

            task = asyncio.create_task(reader())
            while sent < size:
                w.write(chunk)
                sent += len(chunk)
                await w.drain()
            w.write_eof()
            got = await task
            assert len(got) == size + 5 and got.endswith(b"<eof>") and got.count(b"x") == size
            w.close()
            await until(lambda: series(m.node1, "outbound", "src", vip == ECHO_VIP and "echo" or "echo-remote")["conns"] == 0)
            svc_name = "echo" if vip == ECHO_VIP else "echo-remote"
            src = series(m.node1, "outbound", "src", svc_name)
            dst = series(m.node1, "outbound", "dst", svc_name)
            assert (src["read"], src["write"]) == (size, size + 5)
            assert (dst["write"], dst["read"]) == (size, size + 5)  # handshake bytes are not payload
            assert src["open"] == src["close"] == dst["open"] == dst["close"] == 1
            if vip == REMOTE_ECHO_VIP:
                await until(lambda: series(m.node2, "inbound", "dst")["close"] == 1)
                isrc, idst = series(m.node2, "inbound", "src"), series(m.node2, "inbound", "dst")
                assert (isrc["read"], isrc["write"], idst["write"], idst["read"]) == (size, size + 5, size, size + 5)

    run(body)


@pytest.mark.parametrize("vip,error", [(DEAD_VIP, "connect_failed")], ids=["local"])
def test_upstream_refused_closes_client_fast_and_counts(vip: str, error: str) -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((vip, 80))
            w.write(b"hello?")
            start = time.monotonic()
            with pytest.raises(ConnectionResetError):
                await r.read()  # RST (SO_LINGER 0), not a clean EOF the client could trust
            assert time.monotonic() - start < 0.5
            assert m.node1.metrics.errors("outbound", error) == 1
            await until(lambda: series(m.node1, "outbound", "src", "dead")["close"] == 1)
            w.close()

    run(body)


def test_remote_pod_refused_is_502_on_inbound_and_reset_on_outbound() -> None:
    async def body() -> None:
        async with mesh() as m:
            remote_dead = ("127.0.2.12", free_port("127.0.2.12"))
            # A node2 pod that exists in the config but whose port is closed.
            cfg2 = m.node2.view
            extra = pod("default", "gone-2", remote_dead[0], "node2")
            for p in (m.node1, m.node2):
                base = NodeConfig(version=2, node=p.node, nodes=tuple(p.view.node_info(n) for n in ("node1", "node2")), pods=(extra,))
                p.apply_config(base)
            assert cfg2 is not m.node2.view  # swapped, not mutated
            r, w = await m.connect(remote_dead)
            with pytest.raises(ConnectionResetError):
                await r.read()
            assert m.node1.metrics.errors("outbound", "tunnel_refused") == 1
            assert m.node2.metrics.errors("inbound", "connect_failed") == 1
            w.close()

    run(body)


def test_unknown_original_destination_is_closed() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect(None)  # the BPF map has no entry for this socket
            with pytest.raises(ConnectionResetError):
                await r.read()
            r2, w2 = await m.connect(("192.0.2.1", 80))  # an entry, but not meshed in the config
            with pytest.raises(ConnectionResetError):
                await r2.read()
            assert m.node1.metrics.errors("outbound", "no_original_dst") == 1
            assert m.node1.metrics.errors("outbound", "no_route") == 1
            await until(lambda: m.node1.open_connections == 0)
            w.close()
            w2.close()

    run(body)


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (encode_request(TunnelRequest(ECHO_IP, 80, None, "default/echo-1")), 404),  # node1's pod, asked of node2
        (encode_request(TunnelRequest(HTTP_IP, 80, None, "default/someone-else")), 404),  # stale view
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT 127.0.2.10:0 NMTUN/1\r\n\r\n", 400),
    ],
    ids=["not-local", "pod-mismatch", "garbage", "bad-port"],
)
def test_inbound_refuses_with_a_status(request_bytes: bytes, status: int) -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await asyncio.open_connection(*m.node2.addresses.inbound)
            w.write(request_bytes)
            resp, _ = ResponseParser().feed(await r.read())
            assert resp.status == status
            assert m.node2.metrics.errors("inbound", "unknown_pod" if status == 404 else "handshake_error") == 1
            w.close()

    run(body)


def test_inbound_records_source_identity_and_relays_leftover() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await asyncio.open_connection(*m.node2.addresses.inbound)
            ident = "spiffe://cluster.local/ns/default/sa/client"
            w.write(encode_request(TunnelRequest(HTTP_IP, m.ports["http"], ident, "default/web-2")) + b"GET /early HTTP/1.1\r\nhost: x\r\n\r\n")
            assert await r.readuntil(b"\r\n\r\n") == b"NMTUN/1 200 OK\r\n\r\n"
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            [conn] = list(m.node2._connections)
            accepted = conn.get_protocol().relay.origin  # handed over to the relay, facts kept
            assert accepted.src_identity == ident and accepted.request.dst_pod == "default/web-2"
            w.close()

    run(body)


def test_metrics_render_has_linkerd_names_and_directions() -> None:
    async def body() -> bytes:
        async with mesh() as m:
            r, w = await m.connect((REMOTE_ECHO_VIP, 80))
            w.write(b"abc")
            await r.readexactly(3)
            w.close()
            await until(lambda: series(m.node2, "inbound", "src")["close"] == 1)
            return m.node1.metrics.render() + m.node2.metrics.render()

    text = run(body).decode()
    for name in ("tcp_open_total", "tcp_open_connections", "tcp_close_total", "tcp_read_bytes_total", "tcp_write_bytes_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name}" in text
    assert 'tcp_read_bytes_total{direction="outbound",dst_namespace="default",dst_service="echo-remote",peer="src",tls="false"} 3.0' in text
    assert 'tcp_write_bytes_total{direction="outbound",dst_namespace="default",dst_service="echo-remote",peer="dst",tls="false"} 3.0' in text
    assert 'tcp_open_total{direction="inbound",dst_namespace="default",dst_service="",peer="src",tls="false"} 1.0' in text
    assert "nodemesh_config_version 1.0" in text


def test_stop_closes_live_connections() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect((ECHO_VIP, 80))
            w.write(b"x")
            await r.readexactly(1)
            await m.node1.stop()
            assert not m.node1.listening
            assert await r.read() == b""  # closed under us
            await until(lambda: not Echo.instances[0].transport.get_extra_info("socket") or Echo.instances[0].transport.is_closing())
            w.close()

    run(body)
