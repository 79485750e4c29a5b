"""Authorization of HTTP requests the L7 proxy sends (a service VIP speaking HTTP/1.1), on real node
proxies and loopback sockets: a same-node endpoint is authorized per request with the source pod's
identity (route policies included: 403, the connection stays usable); a cross-node endpoint is
authorized by its node's mTLS tunnel server, and pooled upstream streams never carry another
client's requests; a policy change reaches live L7 connections (in-flight requests cut, the next
ones 403, pooled tunnel streams cut).

Policies and routes come from real cluster objects through the controller's functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import pytest

from nodemesh.agent.identity_client import AgentIdentity
from nodemesh.agent.proxy import NodeProxy
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.controller.discovery import node_config
from nodemesh.controller.policy import with_policy
from nodemesh.model import ClusterState, parse_documents
from nodemesh.nodeconfig import NodeConfig
from nodemesh.scrape import total

from tests import objects_yaml as y

from . import loopback
from .loopback import PodIPs, redirected_socket, two_node_cluster
from .test_mtls_tunnel import sign_into

pytestmark = pytest.mark.timeout(30)
run = functools.partial(loopback.run, budget=20.0)

TD = "cluster.local"
IPS = PodIPs(client="127.0.7.20", other="127.0.7.21", echo1="127.0.7.10", echo2="127.0.8.11")
CLIENT_IP, OTHER_IP, ECHO1_IP, ECHO2_IP = IPS
LOCAL_VIP, REMOTE_VIP = "10.96.7.10", "10.96.7.20"
CLIENT_ID = f"spiffe://{TD}/ns/demo/sa/client"
OTHER_ID = f"spiffe://{TD}/ns/demo/sa/other"
ECHO_ID = f"spiffe://{TD}/ns/demo/sa/echo"


def cluster_yaml(port: int) -> str:
    services = (("echo-local", LOCAL_VIP, "echo-1"), ("echo-remote", REMOTE_VIP, "echo-2"))
    return two_node_cluster(IPS, port, "http", accounts=("client", "other"), services=services) + y.server("echo", "echo", "http", "HTTP/1")


ALLOW_CLIENT = y.allow_account("allow-client", "Server", "echo", "client")

# Two routes on echo-local; `other` may use only the health route.
ROUTES = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: health, namespace: demo}
spec:
  parentRefs: [{group: core, kind: Service, name: echo-local, port: 80}]
  rules: [{matches: [{path: {type: PathPrefix, value: /health}}], backendRefs: [{name: echo-local, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: demo}
spec:
  parentRefs: [{group: core, kind: Service, name: echo-local, port: 80}]
  rules: [{matches: [{path: {type: PathPrefix, value: /api}}], backendRefs: [{name: echo-local, port: 80}]}]
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: other-on-health, namespace: demo}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: health}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: other}]
"""


class Backend(asyncio.Protocol):
    """A pod's HTTP server (h11): answers {"pod", "path"} and records which paths reached which pod.
    A path starting with /slow is answered after 5 s (an in-flight request to cut)."""

    seen: list[tuple[str, str]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pod = {ECHO1_IP: "echo-1", ECHO2_IP: "echo-2"}[transport.get_extra_info("sockname")[0]]
        self.h = h11.Connection(h11.SERVER)

    def data_received(self, data: bytes) -> None:
        self.h.receive_data(data)
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                path = ev.target.decode()
                Backend.seen.append((self.pod, path))
                body = json.dumps({"pod": self.pod, "path": path}).encode()
                out = self.h.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))])) + self.h.send(h11.Data(data=body)) + self.h.send(h11.EndOfMessage())
                if path.startswith("/slow"):
                    asyncio.get_running_loop().call_later(5.0, lambda: None if self.transport.is_closing() else self.transport.write(out))
                    return
                self.transport.write(out)
            elif isinstance(ev, h11.EndOfMessage):
                self.h.start_next_cycle()


class Client:
    """One keep-alive HTTP/1.1 client connection from a pod IP, parsed with h11."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.h = h11.Connection(h11.CLIENT)

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.w.write(self.h.send(h11.Request(method="GET", target=path, headers=[("host", "echo.demo")])) + self.h.send(h11.EndOfMessage()))
        status, headers, data = 0, {}, bytearray()
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                self.h.receive_data(await self.r.read(65536))
            elif isinstance(ev, h11.Response):
                status, headers = ev.status_code, {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.h.start_next_cycle()
                return status, headers, bytes(data)
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("closed")


@dataclass
class Mesh:
    proxies: dict[str, NodeProxy]
    orig: dict[tuple[str, int], tuple[str, int]]
    port: int
    ids: dict[str, AgentIdentity] = field(default_factory=dict)
    version: int = 1

    def apply(self, text: str) -> None:
        state = ClusterState().apply(parse_documents(cluster_yaml(self.port) + text, "t.yaml"), "t.yaml")
        self.version += 1
        for name, proxy in self.proxies.items():
            cfg = with_policy(node_config(state, name, self.version), state)
            nodes = tuple(replace(n, internal_ip="127.0.0.1", inbound_port=self.proxies[n.name].addresses.inbound[1]) for n in cfg.nodes)
            cfg = replace(cfg, nodes=nodes)
            proxy.apply_config(cfg)
            if name in self.ids:
                self.ids[name].set_config(cfg)

    async def client(self, src_ip: str, vip: str) -> Client:
        return await self.client_to(src_ip, (vip, 80))

    async def client_to(self, src_ip: str, dst: tuple[str, int]) -> Client:
        """A client whose connection the node1 proxy takes as redirected from `dst`."""
        sock = await redirected_socket(src_ip, dst, self.proxies["node1"].addresses.outbound, self.orig)
        return Client(*await asyncio.open_connection(sock=sock))

    def http_authz(self, node: str, verdict: str, **labels: str) -> float:
        return total(self.proxies[node].metrics.render().decode(), f"inbound_http_authz_{verdict}_total", labels)


@contextlib.asynccontextmanager
async def mesh(policies: str, mtls: bool = False) -> AsyncIterator[Mesh]:
    Backend.seen = []
    loop = asyncio.get_running_loop()
    s1 = await loop.create_server(Backend, ECHO1_IP, 0)
    port = s1.sockets[0].getsockname()[1]
    s2 = await loop.create_server(Backend, ECHO2_IP, port)
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    proxies = {n: NodeProxy(n, original_dst=lambda ip, p: orig.get((ip, p)), connect_timeout=1.0) for n in ("node1", "node2")}
    m = Mesh(proxies, orig, port)
    tunnel_ports: dict[str, int] = {}
    if mtls:
        anchor = new_trust_anchor(TD)
        ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 600)
        m.ids = {n: AgentIdentity(n, "unused", ca.bundle_pem(), TD) for n in proxies}
        for n, p in proxies.items():
            tunnel_ports[n] = (await p.enable_mtls(m.ids[n], ("127.0.0.1", 0), tunnel_addr=lambda node, inbound: ("127.0.0.1", tunnel_ports[node])))[1]
    for p in proxies.values():
        await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    m.apply(policies)
    if mtls:
        for who in (CLIENT_ID, OTHER_ID):
            sign_into(ca, m.ids["node1"], who)
        sign_into(ca, m.ids["node2"], ECHO_ID)
    try:
        yield m
    finally:
        for p in proxies.values():
            await p.stop()
        s1.close()
        s2.close()


def test_vip_requests_to_a_same_node_pod_are_authorized_per_request() -> None:
    async def body() -> None:
        async with mesh(ALLOW_CLIENT) as m:
            c = await m.client(CLIENT_IP, LOCAL_VIP)
            status, _, data = await c.get("/a")
            assert status == 200 and json.loads(data)["pod"] == "echo-1"
            o = await m.client(OTHER_IP, LOCAL_VIP)  # the bypass: HTTP to the VIP, a same-node endpoint
            for i in range(3):  # 403 each time, and the connection stays usable
                status, headers, _ = await o.get(f"/intruder{i}")
                assert status == 403, status
                assert "AuthorizationPolicy" in headers["l5d-proxy-error"] or "no AuthorizationPolicy" in headers["l5d-proxy-error"]
            status, _, _ = await c.get("/b")  # the allowed client is unaffected
            assert status == 200
            assert [p for _, p in Backend.seen] == ["/a", "/b"]  # no intruder byte reached the pod
            assert m.http_authz("node1", "deny", srv_name="echo", client_id=OTHER_ID, target_addr=f"{ECHO1_IP}:{m.port}", route_name="default") == 3
            assert m.http_authz("node1", "allow", srv_name="echo", authz_name="allow-client", client_id=CLIENT_ID) == 2

    run(body)


def test_route_policy_gives_403_per_request_and_keeps_the_connection() -> None:
    async def body() -> None:
        async with mesh(ROUTES) as m:
            o = await m.client(OTHER_IP, LOCAL_VIP)
            assert (await o.get("/health"))[0] == 200  # only a route policy allows it: the connection is not refused
            assert (await o.get("/api/users"))[0] == 403
            assert (await o.get("/elsewhere"))[0] == 403  # no route matched: Server-level policies only
            assert (await o.get("/health/deep"))[0] == 200
            assert [p for _, p in Backend.seen] == ["/health", "/health/deep"]
            assert m.http_authz("node1", "allow", route_name="health", authz_name="other-on-health", srv_name="echo", client_id=OTHER_ID) == 2
            assert m.http_authz("node1", "deny", route_name="api", srv_name="echo", client_id=OTHER_ID) == 1
            assert m.http_authz("node1", "deny", route_name="default", srv_name="echo", client_id=OTHER_ID) == 1

    run(body)


def test_policy_change_cuts_in_flight_requests_and_denies_the_next_ones() -> None:
    async def body() -> None:
        async with mesh(ALLOW_CLIENT) as m:
            idle = await m.client(CLIENT_IP, LOCAL_VIP)
            assert (await idle.get("/first"))[0] == 200
            busy = await m.client(CLIENT_IP, LOCAL_VIP)
            pending = asyncio.ensure_future(busy.get("/slow"))
            while ("echo-1", "/slow") not in Backend.seen:  # the request reached the pod
                await asyncio.sleep(0.01)
            started = time.monotonic()
            m.apply("")  # the allow is removed: the namespace default (deny) governs
            with pytest.raises((ConnectionError, h11.RemoteProtocolError)):
                await asyncio.wait_for(pending, 1.0)
            assert time.monotonic() - started < 1.0
            assert m.proxies["node1"].authz.count("terminate", client_id=CLIENT_ID) == 1
            status, headers, _ = await idle.get("/second")  # the idle keep-alive connection: 403 from now on
            assert status == 403 and "no AuthorizationPolicy authorizes" in headers["l5d-proxy-error"]
            assert ("echo-1", "/second") not in Backend.seen
            m.apply(ALLOW_CLIENT)
            assert (await idle.get("/third"))[0] == 200  # and allowed again, on the same connection

    run(body)


def test_cross_node_pooled_tunnel_streams_are_authorized_by_the_destination() -> None:
    async def body() -> None:
        async with mesh(ALLOW_CLIENT, mtls=True) as m:
            node1, node2 = m.proxies["node1"], m.proxies["node2"]
            c = await m.client(CLIENT_IP, REMOTE_VIP)
            for i in range(3):
                status, _, data = await c.get(f"/c{i}")
                assert status == 200 and json.loads(data)["pod"] == "echo-2"
            assert node2.authz.count("allow", client_id=CLIENT_ID) == 1  # one pooled stream, authorized once
            # Another pod on node1 through the same VIP: its requests must not ride the client's
            # pooled stream; node2 refuses its own stream, and node1 answers 403.
            o = await m.client(OTHER_IP, REMOTE_VIP)
            for i in range(2):
                status, headers, _ = await o.get(f"/o{i}")
                assert status == 403, status
                assert "no AuthorizationPolicy" in headers["l5d-proxy-error"]
            assert node2.authz.count("deny", client_id=OTHER_ID, srv_name="echo", tls="true") == 2
            assert [p for _, p in Backend.seen] == ["/c0", "/c1", "/c2"]
            assert node1.tunnels.connections_opened == 2  # one mTLS connection per source identity
            # A denied client does not trip the endpoint's circuit breaker for everyone else.
            assert (await c.get("/c3"))[0] == 200
            # The allow goes: node2 cuts the pooled stream at once, the next request is refused.
            m.apply("")
            assert node2.authz.count("terminate", client_id=CLIENT_ID) == 1
            await asyncio.sleep(0.1)
            status, _, _ = await c.get("/c4")
            assert status == 403
            assert ("echo-2", "/c4") not in Backend.seen

    run(body)
