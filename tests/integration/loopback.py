"""Scaffolding shared by the loopback integration tests: a bounded uvloop runner, the two-node
loopback cluster (node1 and node2 with 127.0.x pod networks, the deny-by-default demo namespace)
and a client socket the node proxy takes for a redirected one."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar

import uvloop

from tests import objects_yaml as y

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]], budget: float = 10.0) -> T:
    """Runs fn() on a fresh uvloop loop; a hang fails after `budget` seconds instead of blocking."""
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), budget)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


class PodIPs(NamedTuple):
    """client, other and echo-1 on node1, echo-2 on node2; each node's podCIDR is its pods' /24."""

    client: str
    other: str
    echo1: str
    echo2: str


def two_node_cluster(ips: PodIPs, port: int, port_name: str, accounts: Sequence[str] = ("client",),
                     services: Sequence[tuple[str, str, str]] = ()) -> str:
    """Nodes node1 (127.0.0.1) and node2 (127.0.0.2), the meshed demo namespace whose default policy
    is deny, the service accounts `accounts`, the pods client, other, echo-1 and echo-2 (labels app
    and pod; container port `port` named `port_name`) and `services` as (name, VIP, pod it selects)."""
    def cidr(ip: str) -> str:
        return str(ipaddress.ip_network(f"{ip}/24", strict=False))

    def pod(name: str, sa: str, node: str, ip: str, app: str) -> str:
        return y.pod(name, node=node, sa=sa, ip=ip, port=port, port_name=port_name, labels={"app": app, "pod": name})

    return (y.node("node1", cidr(ips.echo1), "127.0.0.1") + y.node("node2", cidr(ips.echo2), "127.0.0.2")
            + y.meshed_namespace("demo", default_policy="deny") + "".join(y.service_account(a) for a in accounts)
            + pod("client", "client", "node1", ips.client, "client") + pod("other", "other", "node1", ips.other, "other")
            + pod("echo-1", "echo", "node1", ips.echo1, "echo") + pod("echo-2", "echo", "node2", ips.echo2, "echo")
            + "".join(y.service(name, vip, {"pod": target}, port_name, port) for name, vip, target in services))


async def redirected_socket(src_ip: str, dst: tuple[str, int], outbound: tuple[str, int],
                            orig: dict[tuple[str, int], tuple[str, int]]) -> socket.socket:
    """A socket from pod IP `src_ip` connected to a node proxy's outbound listener, with `dst`
    recorded in `orig` as its original destination (what BPF would have answered)."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((src_ip, 0))
    orig[sock.getsockname()] = dst
    await asyncio.get_running_loop().sock_connect(sock, outbound)
    return sock
