"""HTTP/2 and gRPC through the node proxy on real loopback sockets (uvloop): the h2 preface is
detected on a service port and the connection served by agent/h2_proxy.py, each stream balanced on
its own over pooled multiplexed upstream connections to real h2 servers (nodemesh/sample_h2.py).
The BPF original-destination lookup is a dict (test seam); clients and servers are h2-based."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, SettingsFrame

from nodemesh import sample_h2
from nodemesh.agent.proxy import NodeProxy
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod
from nodemesh.sample_server import Identity
from nodemesh.scrape import total

from . import loopback

pytestmark = pytest.mark.timeout(60)
run = functools.partial(loopback.run, budget=30.0)

CLIENT_IP = "127.0.6.20"
VIP, VIP_EMPTY = "10.96.6.10", "10.96.6.40"
A_IP, B_IP = "127.0.6.11", "127.0.6.12"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def pod(name: str, ip: str) -> WorkloadPod:
    return WorkloadPod("demo", name, ip, "node1", name, f"spiffe://cluster.local/ns/demo/sa/{name}")


@dataclass
class Mesh:
    proxy: NodeProxy
    orig: dict[tuple[str, int], tuple[str, int]]
    servers: dict[str, asyncio.AbstractServer]
    ports: dict[str, int]
    pods: dict[str, WorkloadPod]
    version: int = 1

    def services(self, names: tuple[str, ...] = ("a", "b")) -> list[ServiceView]:
        eps = tuple(Endpoint("demo", self.pods[n].name, self.pods[n].ip, self.ports[n], "node1", self.pods[n].identity) for n in names)
        return [ServiceView("demo", "grpc", VIP, (ServicePortView(80, "grpc", "TCP", eps),)),
                ServiceView("demo", "empty", VIP_EMPTY, (ServicePortView(80, "grpc", "TCP", ()),))]

    def configure(self, services: list[ServiceView], extra: dict[str, Any] | None = None) -> None:
        self.version += 1
        self.proxy.apply_config(NodeConfig(
            version=self.version, node="node1", nodes=(NodeInfo("node1", "127.0.0.1", "127.0.6.0/24", 1),),
            services=tuple(services), pods=tuple(self.pods.values()), extra=extra or {},
        ))

    def socket_to(self, dst: tuple[str, int]) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((CLIENT_IP, 0))
        self.orig[sock.getsockname()] = dst
        return sock

    async def client(self, dst: tuple[str, int] = (VIP, 80)) -> sample_h2.H2Client:
        sock = self.socket_to(dst)
        assert self.proxy.addresses is not None
        await asyncio.get_running_loop().sock_connect(sock, self.proxy.addresses.outbound)
        return await sample_h2.H2Client.connect("", 0, sock=sock)

    async def raw(self, dst: tuple[str, int] = (VIP, 80)) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self.socket_to(dst)
        assert self.proxy.addresses is not None
        await asyncio.get_running_loop().sock_connect(sock, self.proxy.addresses.outbound)
        return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def mesh(behaviours: dict[str, sample_h2.Behaviour] | None = None) -> AsyncIterator[Mesh]:
    behaviours = behaviours or {}
    servers = {n: await sample_h2.serve(ip, 0, behaviours.get(n, sample_h2.Behaviour()), Identity(f"grpc-{n}", "demo", "node1"))
               for n, ip in (("a", A_IP), ("b", B_IP))}
    ports = {n: s.sockets[0].getsockname()[1] for n, s in servers.items()}
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    proxy = NodeProxy("node1", original_dst=lambda ip, port: orig.get((ip, port)), connect_timeout=1.0)
    await proxy.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    pods = {n: pod(f"grpc-{n}", ip) for n, ip in (("a", A_IP), ("b", B_IP))}
    pods["client"] = pod("client", CLIENT_IP)
    m = Mesh(proxy, orig, servers, ports, pods)
    m.configure(m.services())
    try:
        yield m
    finally:
        await proxy.stop()
        for s in servers.values():
            s.close()


def route(extra_rule: dict[str, Any], annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    rule = {"route": "demo/grpc", "matches": [{}], "backends": [], **extra_rule}
    return {"http_routes": [{"parent": ["demo", "grpc", 80], "rules": [rule]}]}


def pod_of(r: sample_h2.Response) -> str:
    import json

    [msg] = sample_h2.grpc_messages(r.data)
    return str(json.loads(msg)["pod"])


def test_grpc_calls_are_balanced_per_request_over_one_client_connection() -> None:
    async def body() -> None:
        async with mesh() as m:
            c = await m.client()
            rs = await asyncio.gather(*(c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}")) for _ in range(60)))
            assert all(r.status == 200 and r.grpc_status == 0 for r in rs)
            by_pod = Counter(pod_of(r) for r in rs)
            assert set(by_pod) == {"grpc-a", "grpc-b"} and min(by_pod.values()) >= 5, by_pod
            # one client connection in, one multiplexed upstream connection per endpoint out
            pool = m.proxy.h2.pool
            conns = [len(pool._conns[k]) for k in pool._conns]
            assert conns == [1, 1], conns
            c.close()
            text = m.proxy.metrics.render().decode()
            auth = {"authority": "grpc.demo.svc.cluster.local:80", "dst_service": "grpc"}
            assert total(text, "request_total", auth) == 60
            assert total(text, "response_total", {**auth, "grpc_status_code": "0", "classification": "success", "status_code": "200"}) == 60
            assert total(text, "tcp_open_total", {"peer": "dst", "dst_service": "grpc"}) == 2

    run(body)


def test_trailers_pass_both_ways_and_grpc_status_is_recorded() -> None:
    async def body() -> None:
        async with mesh({"b": sample_h2.Behaviour(fail_rate=1.0, fail_code=14)}) as m:
            c = await m.client()
            r = await c.call(sample_h2.ECHO_PATH, [b"x" * 1000, b"y" * 10], trailers=[(b"x-client-trailer", b"t-123")])
            assert r.status == 200 and r.data == b"x" * 1000 + b"y" * 10
            assert r.trailers[b"grpc-status"] == b"0" and r.trailers[b"x-client-trailer"] == b"t-123" and r.trailers[b"x-echo-bytes"] == b"1010"
            m.configure(m.services(("b",)))  # only the failing endpoint: trailers-only grpc-status 14
            for _ in range(3):
                r = await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))
                assert r.status == 200 and r.grpc_status == 14 and r.headers[b"grpc-message"] == b"injected failure"
            c.close()
            text = m.proxy.metrics.render().decode()
            fail = {"dst_service": "grpc", "grpc_status_code": "14", "classification": "failure"}
            assert total(text, "response_total", fail) == 3
            assert total(text, "route_response_total", {**fail, "route": "default"}) == 3
            assert total(text, "response_total", {"dst_service": "grpc", "grpc_status_code": "0", "classification": "success"}) == 1

    run(body)


def test_big_bodies_stream_with_flow_control_both_ways() -> None:
    async def body() -> None:
        async with mesh() as m:
            m.configure(m.services(("a",)))
            c = await m.client()
            size, chunk = 16 * 1024 * 1024, b"z" * 65536
            sent = 0

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal sent
                while sent < size:
                    sent += len(chunk)
                    yield chunk

            # A reader that credits nothing: the echo backs up through the proxy to the sender,
            # which must stall long before the whole body went out (nothing buffers it whole).
            c.hold = True
            call = asyncio.ensure_future(c.call(sample_h2.ECHO_PATH, chunks()))
            await asyncio.sleep(1.0)
            stalled_at = sent
            assert stalled_at < 4 * 1024 * 1024, f"sent {stalled_at} bytes with no reader: flow control not applied"
            c.release()
            t0 = time.monotonic()
            r = await asyncio.wait_for(call, 20)
            assert r.status == 200 and len(r.data) == size and r.trailers[b"x-echo-bytes"] == str(size).encode()
            assert r.data == chunk * (size // len(chunk))
            print(f"stalled after {stalled_at} bytes; 16 MiB echoed in {time.monotonic() - t0:.2f}s")
            c.close()

    run(body)


def _frames(data: bytes) -> list[Frame]:
    out = []
    while len(data) >= 9:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        out.append(f)
        data = data[9 + length:]
    return out


@pytest.mark.parametrize(("after_preface", "error_code", "reason"), [
    (DataFrame(1, data=b"x").serialize(), 1, "not SETTINGS"),  # RFC 9113 3.4: SETTINGS must come first
    (SettingsFrame(0).serialize() + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", 1, "Stream ID must be non-zero"),  # DATA on stream 0
    (SettingsFrame(0).serialize() + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00abcde", 6, "protocol error"),  # SETTINGS of 5 bytes
], ids=["first-frame-not-settings", "data-on-stream-0", "settings-bad-length"])
def test_protocol_errors_end_the_connection_with_a_goaway_that_says_why(after_preface: bytes, error_code: int, reason: str) -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.raw()
            w.write(PREFACE + after_preface)
            data = await asyncio.wait_for(r.read(), 5)  # the proxy closes after its GOAWAY
            goaways = [f for f in _frames(data) if isinstance(f, GoAwayFrame)]
            assert goaways, data
            g = goaways[-1]
            assert g.error_code == error_code and reason in g.additional_data.decode(), (g.error_code, g.additional_data)
            assert m.proxy.h2.pool._conns == {}  # nothing was sent to any endpoint
            w.close()

    run(body)


def test_grpc_retries_on_configured_codes_within_the_budget() -> None:
    async def body() -> None:
        async with mesh({"a": sample_h2.Behaviour(fail_rate=1.0, fail_code=14)}) as m:
            # grpc-a fails fast, so P2C-EWMA favours it until its breaker opens after 7 failures in a
            # row: with 10 attempts every call still ends at grpc-b.
            m.configure(m.services(), route({"retry": {"codes": [], "grpc_codes": [14], "attempts": 10}}))
            c = await m.client()
            rs = [await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}")) for _ in range(30)]
            assert [r.grpc_status for r in rs] == [0] * 30
            assert {pod_of(r) for r in rs} == {"grpc-b"}
            c.close()
            text = m.proxy.metrics.render().decode()
            retries = total(text, "route_retry_total", {"route": "demo/grpc"})
            assert 1 <= retries <= 10  # failures of grpc-a were retried (until its breaker opened)
            assert total(text, "route_response_total", {"route": "demo/grpc", "grpc_status_code": "0"}) == 30

    run(body)


def test_no_retry_without_the_grpc_condition_and_route_timeout_is_deadline_exceeded() -> None:
    async def body() -> None:
        async with mesh({"a": sample_h2.Behaviour(latency_ms=1000), "b": sample_h2.Behaviour(latency_ms=1000)}) as m:
            m.configure(m.services(), route({"timeout": 0.2}))
            c = await m.client()
            t0 = time.monotonic()
            r = await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))
            took = time.monotonic() - t0
            assert r.status == 200 and r.grpc_status == 4 and b"timed out" in r.headers[b"l5d-proxy-error"], r
            assert 0.19 <= took < 0.6, took
            # plain h2 (not gRPC) gets 504
            r = await c.call("/plain", grpc=False, method="GET")
            assert r.status == 504 and b"timed out" in r.headers[b"l5d-proxy-error"]
            c.close()

    run(body)


def test_no_endpoints_is_unavailable_with_a_reason() -> None:
    async def body() -> None:
        async with mesh() as m:
            c = await m.client((VIP_EMPTY, 80))
            r = await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))
            assert r.status == 200 and r.grpc_status == 14 and b"no endpoints" in r.headers[b"l5d-proxy-error"]
            r = await c.call("/x", grpc=False, method="GET")
            assert r.status == 503 and b"no endpoints" in r.headers[b"l5d-proxy-error"]
            c.close()
            # the service leaves the config under a live connection: its next calls say so
            c = await m.client()
            assert (await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))).grpc_status == 0
            m.configure(m.services()[1:])
            r = await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))
            assert r.grpc_status == 14 and b"no longer in the config" in r.headers[b"l5d-proxy-error"]
            c.close()

    run(body)


def test_a_client_reset_cancels_the_upstream_stream_and_the_connection_stays_usable() -> None:
    async def body() -> None:
        async with mesh() as m:
            m.configure(m.services(("a",)))
            c = await m.client()

            async def forever() -> AsyncIterator[bytes]:
                while True:
                    yield b"q" * 1024
                    await asyncio.sleep(0.01)

            call = asyncio.ensure_future(c.call(sample_h2.ECHO_PATH, forever()))
            await asyncio.sleep(0.3)
            [sid] = list(c.streams)
            c.conn.reset_stream(sid)
            c.flow.flush()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            [up] = m.proxy.h2.pool._conns.values()
            for _ in range(50):
                if not up[0].streams:
                    break
                await asyncio.sleep(0.02)
            assert up[0].streams == {} and up[0].reserved == 0
            r = await c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}"))
            assert r.grpc_status == 0
            c.close()

    run(body)


def test_same_node_endpoints_are_authorized_per_request() -> None:
    from nodemesh.authz import Authorization, NodePolicy, PodPolicy, ServerPolicy

    async def body() -> None:
        async with mesh() as m:
            c = await m.client()  # connected while every client is allowed
            rs = await asyncio.gather(*(c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}")) for _ in range(20)))
            assert {r.grpc_status for r in rs} == {0}
            # A policy change on the live connection: grpc-a now admits only an admin identity.
            only_admin = Authorization("only-admin", "Server", identity_sets=(("spiffe://cluster.local/ns/demo/sa/admin",),))
            policy = NodePolicy(pods=(PodPolicy("demo", "grpc-a", A_IP, servers=(ServerPolicy("grpc-a", m.ports["a"], authorizations=(only_admin,)),)),))
            m.configure(m.services(), {"policy": policy.to_dict()})
            rs = await asyncio.gather(*(c.call(sample_h2.WHO_PATH, sample_h2.grpc_frame(b"{}")) for _ in range(40)))
            denied = [r for r in rs if r.grpc_status == 7]
            assert denied and all(b"unauthorized request to demo/grpc-a" in r.headers[b"l5d-proxy-error"] for r in denied)
            # a denial is an answer, not an endpoint failure: the breaker does not eject grpc-a (as
            # with Linkerd, where the 403 comes from the server's proxy), so most calls may land there
            assert all(pod_of(r) == "grpc-b" for r in rs if r.grpc_status == 0)
            r = await c.call("/plain", grpc=False, method="GET")  # a plain h2 request to grpc-a would get 403
            assert r.status in (200, 403)
            c.close()
            text = m.proxy.metrics.render().decode()
            assert total(text, "inbound_http_authz_deny_total", {"srv_name": "grpc-a", "route_name": "default"}) >= len(denied)

    run(body)
