"""Authorization enforced by real node proxies on loopback sockets (BPF skipped, as in
test_proxy_relay): the same-node path (outbound local plan) and the cross-node path (inbound) in one
matrix, live cuts on policy change, and the last good policy kept on a malformed update.

The policy comes from real cluster objects through the controller's functions (node_config +
with_policy), so the whole chain model -> controller -> wire -> agent is exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from nodemesh.agent.proxy import NodeProxy
from nodemesh.controller.discovery import node_config
from nodemesh.controller.policy import with_policy
from nodemesh.model import ClusterState, parse_documents
from nodemesh.nodeconfig import NodeConfig
from nodemesh.scrape import total

from tests import objects_yaml as y

from .loopback import PodIPs, redirected_socket, run, two_node_cluster

pytestmark = pytest.mark.timeout(20)

IPS = PodIPs(client="127.0.1.20", other="127.0.1.21", echo1="127.0.1.10", echo2="127.0.2.11")
CLIENT_IP, OTHER_IP, ECHO1_IP, ECHO2_IP = IPS
TARGETS = {"same-node": ECHO1_IP, "cross-node": ECHO2_IP}
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"


def cluster_yaml(port: int) -> str:
    return two_node_cluster(IPS, port, "echo")


ALLOW = y.server("echo", "echo", "echo") + y.allow_account("allow-client", "Server", "echo", "client")


class Echo(asyncio.Protocol):
    accepted: list[str] = []  # pod IPs that accepted a connection: a refused client must add none

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Echo.accepted.append(transport.get_extra_info("sockname")[0])

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@dataclass
class Mesh:
    proxies: dict[str, NodeProxy]
    orig: dict[tuple[str, int], tuple[str, int]]
    port: int
    version: int = 1

    def apply(self, text: str) -> None:
        """The controller's work for both nodes, then each agent applies its config."""
        state = ClusterState().apply(parse_documents(text, "t.yaml"), "t.yaml")
        self.version += 1
        for name, proxy in self.proxies.items():
            cfg = with_policy(node_config(state, name, self.version), state)
            proxy.apply_config(self.addressed(cfg))

    def addressed(self, cfg: NodeConfig) -> NodeConfig:
        # Both proxies listen on 127.0.0.1 with ephemeral inbound ports.
        nodes = tuple(replace(n, internal_ip="127.0.0.1", inbound_port=self.proxies[n.name].addresses.inbound[1]) for n in cfg.nodes)
        return replace(cfg, nodes=nodes)

    async def connect(self, src_ip: str, dst_ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await redirected_socket(src_ip, (dst_ip, self.port), self.proxies["node1"].addresses.outbound, self.orig)
        return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def mesh(policies: str = ALLOW) -> AsyncIterator[Mesh]:
    Echo.accepted = []
    loop = asyncio.get_running_loop()
    s1 = await loop.create_server(Echo, ECHO1_IP, 0)
    port = s1.sockets[0].getsockname()[1]
    s2 = await loop.create_server(Echo, ECHO2_IP, port)
    orig: dict[tuple[str, int], tuple[str, int]] = {}
    proxies = {n: NodeProxy(n, original_dst=lambda ip, p: orig.get((ip, p)), connect_timeout=1.0) for n in ("node1", "node2")}
    for p in proxies.values():
        await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    m = Mesh(proxies, orig, port)
    m.apply(cluster_yaml(port) + policies)
    try:
        yield m
    finally:
        for p in proxies.values():
            await p.stop()
        s1.close()
        s2.close()


async def refused(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """True if the proxy cut the connection (RST or EOF) instead of relaying."""
    w.write(b"hello?")
    try:
        data = await asyncio.wait_for(r.read(100), 2.0)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        w.close()
    return data == b""


def node_of(ip: str) -> str:
    return "node1" if ip == ECHO1_IP else "node2"


@pytest.mark.parametrize("path", list(TARGETS))
def test_only_the_allowed_service_account_gets_through(path: str) -> None:
    async def body() -> None:
        async with mesh() as m:
            target = TARGETS[path]
            r, w = await m.connect(CLIENT_IP, target)
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
            assert Echo.accepted == [target]

            r, w = await m.connect(OTHER_IP, target)
            assert await refused(r, w)
            assert Echo.accepted == [target]  # the refused client never reached the pod

            authz = m.proxies[node_of(target)].authz
            assert authz.count("allow", srv_name="echo", authz_name="allow-client", client_id=CLIENT_ID) == 1
            assert authz.count("deny", srv_name="echo", client_id="spiffe://cluster.local/ns/demo/sa/other") == 1
            text = m.proxies[node_of(target)].metrics.render().decode()
            assert total(text, "inbound_tcp_authz_allow_total", {"srv_kind": "Server", "srv_name": "echo", "authz_kind": "AuthorizationPolicy",
                                                                 "authz_name": "allow-client", "tls": "false", "client_id": CLIENT_ID}) == 1
            assert total(text, "inbound_tcp_authz_deny_total", {"srv_name": "echo", "target_addr": f"{target}:{m.port}"}) == 1

    run(body)


@pytest.mark.parametrize("path", list(TARGETS))
def test_removing_the_allow_cuts_a_live_connection_within_a_second(path: str) -> None:
    async def body() -> None:
        async with mesh() as m:
            target = TARGETS[path]
            r, w = await m.connect(CLIENT_IP, target)
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            started = time.monotonic()
            m.apply(cluster_yaml(m.port))  # Server and allow removed: the namespace default (deny) governs
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 1.0)
            assert time.monotonic() - started < 1.0
            w.close()
            assert m.proxies[node_of(target)].authz.count("terminate", client_id=CLIENT_ID) == 1
            r, w = await m.connect(CLIENT_IP, target)  # and new connections are refused at once
            assert await refused(r, w)

    run(body)


ALSO_OTHER = y.allow_account("allow-other", "Server", "echo", "other") + y.service_account("other")


def test_a_change_that_still_allows_keeps_live_connections() -> None:
    async def body() -> None:
        async with mesh() as m:
            r, w = await m.connect(CLIENT_IP, ECHO2_IP)
            w.write(b"a")
            assert await r.readexactly(1) == b"a"
            m.apply(cluster_yaml(m.port) + ALLOW + ALSO_OTHER)  # the policy changes, client still allowed
            w.write(b"b")
            assert await r.readexactly(1) == b"b"
            w.close()
            assert m.proxies["node2"].authz.count("terminate") == 0
            r, w = await m.connect(OTHER_IP, ECHO2_IP)  # and the new allow applies to new connections
            w.write(b"c")
            assert await r.readexactly(1) == b"c"
            w.close()

    run(body)


def test_malformed_policy_keeps_the_last_good_one() -> None:
    async def body() -> None:
        async with mesh() as m:
            node2 = m.proxies["node2"]
            good = node2.authz.policy
            state = ClusterState().apply(parse_documents(cluster_yaml(m.port), "t.yaml"), "t.yaml")  # no allow at all
            cfg = m.addressed(with_policy(node_config(state, "node2", 99), state))
            broken = dict(cfg.extra["policy"], unknown_pod="allow-everything")
            node2.apply_config(replace(cfg, extra={"policy": broken}))
            assert node2.view.version == 99  # the rest of the config applies
            assert node2.authz.policy == good and node2.authz.rejected_total == 1  # the policy does not
            assert "nodemesh_policy_rejected_total 1.0" in node2.metrics.render().decode()
            r, w = await m.connect(CLIENT_IP, ECHO2_IP)  # still enforcing the last good policy
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
            r, w = await m.connect(OTHER_IP, ECHO2_IP)
            assert await refused(r, w)

    run(body)
