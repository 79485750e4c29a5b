"""L7 in the node proxy on real loopback sockets (uvloop): detection hand-off, HTTP/1.1 proxying,
the malformed-request corpus, per-request P2C balancing, routes (split, timeout, retries), circuit
breaking and the golden metrics. The BPF original-destination lookup is a dict (test seam); the
client side uses h11, an independent HTTP/1.1 implementation, as the oracle.
"""

from __future__ import annotations

import asyncio
import random
import contextlib
import functools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from nodemesh import sample_server
from nodemesh.agent.proxy import NodeProxy
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

from . import loopback

pytestmark = pytest.mark.timeout(60)
run = functools.partial(loopback.run, budget=20.0)

CLIENT_IP = "127.0.5.20"
VIP, VIP_B, VIP_RAW, VIP_EMPTY = "10.96.5.10", "10.96.5.20", "10.96.5.30", "10.96.5.40"
A_IP, B_IP, C_IP, RAW_IP = "127.0.5.11", "127.0.5.12", "127.0.5.13", "127.0.5.14"


def pod(name: str, ip: str) -> WorkloadPod:
    return WorkloadPod("demo", name, ip, "node1", name, f"spiffe://cluster.local/ns/demo/sa/{name}")


def service(name: str, vip: str, backends: list[tuple[WorkloadPod, int]]) -> ServiceView:
    eps = tuple(Endpoint(p.namespace, p.name, p.ip, port, p.node, p.identity) for p, port in backends)
    return ServiceView("demo", name, vip, (ServicePortView(80, "http", "TCP", eps),))


class Recorder(asyncio.Protocol):
    """A raw backend that records every byte it gets and answers each request line with 200."""

    received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        Recorder.received += data
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # type: ignore[attr-defined]


class BodyEcho(asyncio.Protocol):
    """Answers each request with its body (h11 parses, so framing is checked independently)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.conn = h11.Connection(h11.SERVER)
        self.body = bytearray()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            if isinstance(ev, h11.Data):
                self.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                out = self.conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(self.body)))]))
                out += self.conn.send(h11.Data(data=bytes(self.body))) + self.conn.send(h11.EndOfMessage())
                self.transport.write(out)  # type: ignore[attr-defined]
                self.body = bytearray()
                self.conn.start_next_cycle()


@dataclass
class Lab:
    proxy: NodeProxy
    orig: dict[tuple[str, int], tuple[str, int]]
    servers: dict[str, asyncio.AbstractServer]
    ports: dict[str, int]
    pods: dict[str, WorkloadPod] = field(default_factory=dict)
    version: int = 1

    async def connect(self, dst: tuple[str, int] = (VIP, 80)) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((CLIENT_IP, 0))
        self.orig[sock.getsockname()] = dst
        assert self.proxy.addresses is not None
        await loop.sock_connect(sock, self.proxy.addresses.outbound)
        return await asyncio.open_connection(sock=sock)

    def configure(self, services: list[ServiceView], extra: dict[str, Any] | None = None) -> None:
        self.version += 1
        self.proxy.apply_config(NodeConfig(
            version=self.version, node="node1", nodes=(NodeInfo("node1", "127.0.0.1", "127.0.5.0/24", 1),),
            services=tuple(services), pods=tuple(self.pods.values()), extra=extra or {},
        ))

    async def replace_server(self, name: str, behaviour: sample_server.Behaviour) -> None:
        ip = {"a": A_IP, "b": B_IP, "c": C_IP}[name]
        self.servers[name].close()
        self.servers[name] = await sample_server.serve(ip, self.ports[name], behaviour, sample_server.Identity(f"web-{name}", "demo", "node1"))


@contextlib.asynccontextmanager
async def lab(behaviours: dict[str, sample_server.Behaviour] | None = None, header_timeout: float = 10.0) -> AsyncIterator[Lab]:
    loop = asyncio.get_running_loop()
    behaviours = behaviours or {}
    servers: dict[str, asyncio.AbstractServer] = {}
    for name, ip in (("a", A_IP), ("b", B_IP), ("c", C_IP)):
        servers[name] = await sample_server.serve(ip, 0, behaviours.get(name, sample_server.Behaviour()), sample_server.Identity(f"web-{name}", "demo", "node1"))
    Recorder.received = bytearray()
    servers["raw"] = await loop.create_server(Recorder, RAW_IP, 0)
    ports = {n: s.sockets[0].getsockname()[1] for n, s in servers.items()}
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    proxy = NodeProxy("node1", original_dst=lambda ip, port: orig.get((ip, port)), connect_timeout=1.0)
    proxy.l7.header_timeout = header_timeout
    await proxy.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    pods = {n: pod(f"web-{n}", ip) for n, ip in (("a", A_IP), ("b", B_IP), ("c", C_IP), ("raw", RAW_IP))}
    pods["client"] = pod("client", CLIENT_IP)
    m = Lab(proxy, orig, servers, ports, pods)
    m.configure(default_services(m))
    try:
        yield m
    finally:
        await proxy.stop()
        for s in m.servers.values():
            s.close()


def default_services(m: Lab) -> list[ServiceView]:
    return [
        service("web", VIP, [(m.pods["a"], m.ports["a"]), (m.pods["b"], m.ports["b"])]),
        service("web-b", VIP_B, [(m.pods["c"], m.ports["c"])]),
        service("raw", VIP_RAW, [(m.pods["raw"], m.ports["raw"])]),
        service("empty", VIP_EMPTY, []),
    ]


class Client:
    """One keep-alive client connection through the proxy, parsed with h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.h = h11.Connection(h11.CLIENT)

    async def request(self, method: str = "GET", path: str = "/", headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        hs = [("host", "web.demo"), *(headers or [])]
        if body and not any(k.lower() == "transfer-encoding" for k, _ in hs):
            hs.append(("content-length", str(len(body))))
        out = self.h.send(h11.Request(method=method, target=path, headers=hs))
        if body:
            out += self.h.send(h11.Data(data=body))
        out += self.h.send(h11.EndOfMessage())
        self.w.write(out)
        status, rh, data = 0, {}, bytearray()
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                chunk = await self.r.read(65536)
                self.h.receive_data(chunk)
                continue
            if isinstance(ev, h11.Response):
                status, rh = ev.status_code, {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
                    self.h.start_next_cycle()
                return status, rh, bytes(data)
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("closed")

    def close(self) -> None:
        self.w.close()


async def client(m: Lab, dst: tuple[str, int] = (VIP, 80)) -> Client:
    return Client(*await m.connect(dst))


def http_series(m: Lab, family: str, **labels: str) -> float:
    text = m.proxy.metrics.render().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(family + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def route_extra(*rules: dict[str, Any], service_name: str = "web") -> dict[str, Any]:
    return {"http_routes": [{"route": "demo/r", "parent": ["demo", service_name, 80], "rules": list(rules)}]}


# ---- HTTP/1.1 proxying -------------------------------------------------------------------------


def test_keepalive_requests_are_balanced_per_request_over_pooled_connections() -> None:
    async def body() -> None:
        async with lab() as m:
            c = await client(m)
            pods = Counter()
            for i in range(40):
                status, _, data = await c.request(path=f"/r{i}")
                assert status == 200
                pods[__import__("json").loads(data)["pod"]] += 1
            assert set(pods) == {"web-a", "web-b"}  # one client connection, both endpoints
            c.close()
            opened = sum(s.open_total for labels, s in m.proxy.metrics.tcp_series() if labels["peer"] == "dst")
            assert opened <= 4  # pooled: not one upstream connection per request

    run(body)


def test_request_and_response_bodies_stream_with_reframing() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(BodyEcho, C_IP, 0)
        async with lab() as m:
            m.configure(default_services(m)[:1] + [service("web-b", VIP_B, [(m.pods["c"], echo.sockets[0].getsockname()[1])])])
            c = await client(m, (VIP_B, 80))
            big = bytes(range(256)) * 4096  # 1 MiB, content-length
            status, _, data = await c.request("POST", "/up", body=big)
            assert status == 200 and data == big
            # chunked request: h11 frames it, the proxy re-chunks, the backend (h11) de-chunks
            hs = [("transfer-encoding", "chunked")]
            out = c.h.send(h11.Request(method="POST", target="/c", headers=[("host", "x"), *hs]))
            for part in (b"abc", b"", b"defgh" * 1000):
                if part:
                    out += c.h.send(h11.Data(data=part))
            out += c.h.send(h11.EndOfMessage())
            c.w.write(out)
            got = bytearray()
            while True:
                ev = c.h.next_event()
                if ev is h11.NEED_DATA:
                    c.h.receive_data(await c.r.read(65536))
                elif isinstance(ev, h11.Data):
                    got += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            assert bytes(got) == b"abc" + b"defgh" * 1000
            c.close()
        echo.close()

    run(body)


def test_hop_by_hop_headers_do_not_reach_the_backend() -> None:
    async def body() -> None:
        async with lab() as m:
            r, w = await m.connect((VIP_RAW, 80))
            w.write(b"GET /x HTTP/1.1\r\nHost: raw\r\nConnection: keep-alive, X-Private\r\nX-Private: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Kept: 1\r\n\r\n")
            assert (await r.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
            w.close()
            sent = bytes(Recorder.received)
            assert b"X-Kept: 1" in sent and b"GET /x HTTP/1.1" in sent
            for dropped in (b"X-Private", b"Keep-Alive", b"TE:", b"Connection"):
                assert dropped not in sent, sent

    run(body)


MALFORMED = {
    "cl-cl conflict": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-cl duplicate": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl + te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te + cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "te not chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te obfuscated": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te space before colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te in http/1.0": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "bad header name": b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "nul in value": b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    "invalid method": b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "huge headers": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_gets_400_and_close_with_nothing_forwarded(raw: bytes) -> None:
    async def body() -> None:
        async with lab() as m:
            r, w = await m.connect((VIP_RAW, 80))
            w.write(raw)
            answer = await asyncio.wait_for(r.read(), 5)  # read() to EOF: the proxy closes
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert b"l5d-proxy-error: " in answer
            assert bytes(Recorder.received) == b""  # smuggling defence: nothing reached the backend
            w.close()

    run(body)


def test_smuggled_second_request_after_valid_one_is_not_forwarded() -> None:
    async def body() -> None:
        async with lab() as m:
            r, w = await m.connect((VIP_RAW, 80))
            w.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /evil HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            answer = await asyncio.wait_for(r.read(), 5)
            assert b"/evil" not in bytes(Recorder.received)
            assert answer.count(b"HTTP/1.1") >= 1
            w.close()

    run(body)


def test_slow_header_gets_408_and_close() -> None:
    async def body() -> None:
        async with lab(header_timeout=0.3) as m:
            r, w = await m.connect((VIP_RAW, 80))
            t0 = time.monotonic()
            w.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
            answer = await asyncio.wait_for(r.read(), 5)
            assert answer.startswith(b"HTTP/1.1 408 ") and 0.25 < time.monotonic() - t0 < 2
            assert bytes(Recorder.received) == b""
            w.close()

    run(body)


def test_no_endpoints_is_503_with_a_reason() -> None:
    async def body() -> None:
        async with lab() as m:
            c = await client(m, (VIP_EMPTY, 80))
            status, headers, _ = await c.request()
            assert status == 503 and "no endpoints" in headers["l5d-proxy-error"]
            status, _, _ = await c.request()  # the connection stays usable
            assert status == 503
            c.close()

    run(body)


# ---- detection -----------------------------------------------------------------------------------


def test_server_speaks_first_port_is_relayed_and_remembered_opaque() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()

        class Banner(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.write(b"220 smtp ready\r\n")  # type: ignore[attr-defined]

        srv = await loop.create_server(Banner, C_IP, 0)
        async with lab() as m:
            m.configure(default_services(m) + [service("smtp", "10.96.5.50", [(m.pods["c"], srv.sockets[0].getsockname()[1])])])
            r, w = await m.connect(("10.96.5.50", 80))
            t0 = time.monotonic()
            assert await asyncio.wait_for(r.readline(), 3) == b"220 smtp ready\r\n"
            first = time.monotonic() - t0
            w.close()
            assert m.proxy.l7.memory.is_opaque(("10.96.5.50", 80))
            r, w = await m.connect(("10.96.5.50", 80))
            t0 = time.monotonic()
            assert await asyncio.wait_for(r.readline(), 3) == b"220 smtp ready\r\n"
            second = time.monotonic() - t0
            w.close()
            assert first >= m.proxy.l7.detect_timeout * 0.9 and second < first
        srv.close()

    run(body)


def test_opaque_port_from_config_skips_detection() -> None:
    async def body() -> None:
        async with lab() as m:
            m.configure(default_services(m), {"opaque_ports": [[VIP_RAW, 80]]})
            r, w = await m.connect((VIP_RAW, 80))
            w.write(b"GET / HTTP/1.1\r\nConnection: Foo\r\nHost: a\r\n\r\n")
            await r.readuntil(b"ok")
            w.close()
            assert b"Connection: Foo" in bytes(Recorder.received)  # relayed as bytes, not re-framed
            assert http_series(m, "request_total") == 0

    run(body)


# ---- balancing, routes, retries, timeouts, breaking ----------------------------------------------


def test_p2c_ewma_avoids_a_slower_endpoint() -> None:
    async def body() -> None:
        async with lab({"b": sample_server.Behaviour(latency_ms=50)}) as m:
            clients = [await client(m) for _ in range(4)]
            pods: Counter[str] = Counter()

            async def loop_(c: Client) -> None:
                for _ in range(50):
                    _, _, data = await c.request()
                    pods[__import__("json").loads(data)["pod"]] += 1

            await asyncio.gather(*(loop_(c) for c in clients))
            assert pods["web-b"] < 0.2 * sum(pods.values()), pods
            for c in clients:
                c.close()

    run(body)


def test_weighted_backends_split_traffic() -> None:
    async def body() -> None:
        async with lab() as m:
            rule = {"route": "demo/split", "matches": [{}], "backends": [
                {"namespace": "demo", "name": "web", "port": 80, "weight": 80},
                {"namespace": "demo", "name": "web-b", "port": 80, "weight": 20},
            ]}
            m.configure(default_services(m), route_extra(rule))
            c = await client(m)
            to_c = 0
            for _ in range(1000):
                _, _, data = await c.request()
                to_c += __import__("json").loads(data)["pod"] == "web-c"
            assert 150 <= to_c <= 250, to_c  # 20% ± 5%
            c.close()
            assert http_series(m, "route_request_total", route="demo/split") == 1000

    run(body)


def test_route_matches_path_header_and_method() -> None:
    async def body() -> None:
        async with lab() as m:
            to_c = [{"namespace": "demo", "name": "web-b", "port": 80, "weight": 1}]
            rules = [
                {"route": "demo/api", "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST"}], "backends": to_c},
                {"route": "demo/canary", "matches": [{"headers": [{"name": "X-Canary", "value": "yes"}]}], "backends": to_c},
            ]
            m.configure(default_services(m), route_extra(*rules))
            c = await client(m)
            pod = lambda data: __import__("json").loads(data)["pod"]  # noqa: E731
            assert pod((await c.request("POST", "/api/x"))[2]) == "web-c"
            assert pod((await c.request("GET", "/api/x"))[2]) in ("web-a", "web-b")  # method does not match
            assert pod((await c.request("POST", "/apix"))[2]) in ("web-a", "web-b")  # prefix is per segment
            assert pod((await c.request("GET", "/", [("x-canary", "yes")]))[2]) == "web-c"
            c.close()

    run(body)


def test_route_timeout_answers_504_in_time() -> None:
    async def body() -> None:
        async with lab({"a": sample_server.Behaviour(latency_ms=1000), "b": sample_server.Behaviour(latency_ms=1000)}) as m:
            m.configure(default_services(m), route_extra({"route": "demo/t", "matches": [{}], "backends": [], "timeout": 0.2}))
            c = await client(m)
            t0 = time.monotonic()
            status, headers, _ = await c.request()
            took = time.monotonic() - t0
            assert status == 504 and 0.19 <= took < 0.3, took
            assert "timed out" in headers["l5d-proxy-error"]
            c.close()

    run(body)


def test_retries_mask_failures_within_the_budget() -> None:
    async def body() -> None:
        # A fixed seed: 0.3^5 per request leaves ~1% of runs with 4+ failures out of 300 by chance.
        random.seed(20261126)
        flaky = sample_server.Behaviour(fail_rate=0.3)
        async with lab({"a": flaky, "b": flaky}) as m:
            m.configure(default_services(m), route_extra({"route": "demo/retry", "matches": [{}], "backends": [], "retry": {"codes": [500], "attempts": 4}}))
            c = await client(m)
            ok = 0
            for _ in range(300):
                ok += (await c.request())[0] == 200
            c.close()
            assert ok >= 297, ok
            retries = http_series(m, "route_retry_total", route="demo/retry")
            requests = http_series(m, "route_request_total", route="demo/retry")
            assert 0 < retries <= 0.2 * requests + 10 * 10  # Linkerd's budget: 20% + 10/s over 10 s

    run(body)


def test_retry_budget_caps_retries_when_everything_fails() -> None:
    async def body() -> None:
        broken = sample_server.Behaviour(fail_rate=1.0)
        async with lab({"a": broken, "b": broken}) as m:
            for st in (m.proxy.l7.balancer,):
                st._policy = __import__("nodemesh.agent.breaker", fromlist=["BreakerPolicy"]).BreakerPolicy(max_failures=1_000_000)
            m.configure(default_services(m), route_extra({"route": "demo/retry", "matches": [{}], "backends": [], "retry": {"codes": [500], "attempts": 3}}))
            c = await client(m)
            for _ in range(200):
                assert (await c.request())[0] == 500
            c.close()
            retries = http_series(m, "route_retry_total", route="demo/retry")
            assert retries <= 0.2 * 200 + 100, retries  # without a budget it would be 600

    run(body)


def test_failing_endpoint_is_ejected_then_probed_back() -> None:
    async def body() -> None:
        failing = sample_server.Behaviour(fail_rate=1.0)
        async with lab({"b": failing}) as m:
            clients = [await client(m) for _ in range(4)]
            log: list[tuple[str, int]] = []

            async def traffic(c: Client, n: int) -> None:  # concurrent, so P2C's in-flight term spreads load
                for _ in range(n):
                    status, _, data = await c.request()
                    log.append((__import__("json").loads(data)["pod"], status))

            await asyncio.gather(*(traffic(c, 100) for c in clients))
            fails = [i for i, (_, s) in enumerate(log) if s == 500]
            breaker = m.proxy.l7.balancer.state(next(e for e in m.proxy.view.service_port(VIP, 80).port.endpoints if e.pod == "web-b")).breaker
            assert breaker.ejections >= 1
            # ejected at the 7th consecutive failure; requests already in flight then, and one probe
            # per later ejection (penalty 1 s ± 50%), may add to it
            assert 7 <= len(fails) <= 7 + len(clients) - 1 + breaker.ejections - 1, Counter(log)
            after = log[fails[-1] + 1 :]
            assert sum(p == "web-b" for p, _ in after) < 0.05 * len(after)
            object.__setattr__(failing, "fail_rate", 0.0)  # the backend recovers (same process, same pooled connection)
            await asyncio.sleep(1.6)  # first penalty: 1 s ± 50%
            log.clear()
            await asyncio.gather(*(traffic(c, 50) for c in clients))
            assert all(s == 200 for _, s in log)
            assert sum(p == "web-b" for p, _ in log) > 10  # probed, succeeded, back in rotation
            for c in clients:
                c.close()

    run(body)


def test_all_endpoints_ejected_fail_fast_with_503() -> None:
    async def body() -> None:
        broken = sample_server.Behaviour(fail_rate=1.0)
        async with lab({"a": broken, "b": broken}) as m:
            c = await client(m)
            codes = Counter([(await c.request())[0] for _ in range(20)])
            assert codes[500] == 14 and codes[503] == 6, codes
            _, headers, _ = await c.request()
            assert "ejected" in headers["l5d-proxy-error"]
            c.close()

    run(body)


def test_golden_metrics_have_linkerd_names_and_the_values_sent() -> None:
    async def body() -> None:
        async with lab({"b": sample_server.Behaviour(fail_rate=1.0)}) as m:
            m.configure([service("web", VIP, [(m.pods["b"], m.ports["b"])]), *default_services(m)[1:]])
            c = await client(m)
            for _ in range(3):
                await c.request()
            c2 = await client(m, (VIP_B, 80))
            for _ in range(5):
                await c2.request()
            c.close()
            c2.close()
            text = m.proxy.metrics.render().decode()
            auth = "web-b.demo.svc.cluster.local:80"
            assert f'request_total{{authority="{auth}",direction="outbound",dst_namespace="demo",dst_service="web-b",tls="false"}} 5.0' in text
            assert f'response_total{{authority="{auth}",classification="success",direction="outbound",dst_namespace="demo",dst_service="web-b",status_code="200",tls="false"}} 5.0' in text
            assert 'classification="failure",direction="outbound",dst_namespace="demo",dst_service="web",status_code="500",tls="false"} 3.0' in text
            assert f'response_latency_ms_count{{authority="{auth}",direction="outbound",dst_namespace="demo",dst_service="web-b",tls="false"}} 5.0' in text
            assert f'response_latency_ms_bucket{{authority="{auth}",direction="outbound",dst_namespace="demo",dst_service="web-b",le="+Inf",tls="false"}} 5.0' in text
            assert 'route_request_total{direction="outbound",dst_namespace="demo",dst_service="web-b",route="default"} 5.0' in text
            assert "# TYPE response_latency_ms histogram" in text and "# TYPE route_response_latency_ms histogram" in text

    run(body)


def test_tls_from_the_app_is_relayed_opaque_and_its_sni_recorded(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import ssl

    ctx = ssl.create_default_context()
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="api.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()  # writes a real ClientHello, then waits for the server
    hello = outgoing.read()

    async def body() -> None:
        async with lab() as m:
            m.configure(default_services(m))
            r, w = await m.connect((VIP_RAW, 80))
            w.write(hello)
            await w.drain()
            for _ in range(100):
                if bytes(Recorder.received).startswith(hello):
                    break
                await asyncio.sleep(0.02)
            w.close()
            assert bytes(Recorder.received).startswith(hello)  # relayed as bytes, untouched
            assert http_series(m, "request_total") == 0

    with caplog.at_level(logging.DEBUG, logger="nodemesh.agent.http_proxy"):
        run(body)
    assert "SNI api.example.test" in caplog.text
