"""The scenarios of one bench run: who sends, to which address, and which processes are "the proxy".

A scenario names its client pod, a target per protocol (HTTP/1.1, h2c, bulk TCP; None where the
path cannot carry it), the processes whose CPU and memory count as its proxy cost, and the
baselines its ratios are taken against. New data paths (mTLS between node proxies, L7, the
sockmap shortcut, spliced same-node TCP) add a Scenario here plus whatever `setup` they need in
runner.py; they then show up in every table, plot and ratio. The nodemesh scenarios measure the
node proxy as built from the tree (L4 relay or L7 by protocol detection, plaintext or mTLS between
nodes): results.json's meta.git names the revision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodemesh.bench import configs

# Service VIPs of labs/bench.yaml (the Service port 80 maps to the servers' HTTP_PORT).
VIP_NODE1, VIP_NODE2 = "10.96.1.1", "10.96.1.2"


@dataclass(frozen=True)
class Target:
    """Where a workload connects: a literal IP, or `pod:<ns>/<name>` resolved at run time."""

    host: str
    port: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    client: str  # pod (ns/name) the load generator runs in
    http: Target
    h2c: Target | None
    bulk: Target | None
    proxies: tuple[str, ...]  # keys of runner-known process groups: agent/<node>, or a started process name
    direct: str = "direct"  # the no-proxy floor with the same placement
    sidecar: str = "sidecar-pair"  # the sidecar-pair model with the same placement
    tags: tuple[str, ...] = field(default=())
    sockmap: bool = True  # the eBPF sockmap shortcut (pod <-> node proxy bytes skip TCP) on every node


def _pod(ref: str, port: int) -> Target:
    return Target(f"pod:{ref}", port)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("direct", "client pod -> server pod on the same node, no proxy (the floor)", "plain/pcli",
             _pod("plain/psrv-1", configs.HTTP_PORT), _pod("plain/psrv-1", configs.H2C_PORT), _pod("plain/psrv-1", configs.BULK_PORT),
             proxies=(), tags=("floor",)),
    Scenario("direct-cross-node", "client pod on node1 -> server pod on node2, no proxy", "plain/pcli",
             _pod("plain/psrv-2", configs.HTTP_PORT), _pod("plain/psrv-2", configs.H2C_PORT), _pod("plain/psrv-2", configs.BULK_PORT),
             proxies=(), direct="direct-cross-node", sidecar="sidecar-pair-cross-node", tags=("floor",)),
    Scenario("nodemesh-same-node", "eBPF redirect (sockmap shortcut on) -> node1 proxy -> server pod on node1", "bench/cli",
             Target(VIP_NODE1, 80), Target(VIP_NODE1, configs.H2C_PORT), Target(VIP_NODE1, configs.BULK_PORT),
             proxies=("agent/node1",), tags=("nodemesh",)),
    Scenario("nodemesh-cross-node", "eBPF redirect -> node1 proxy -> node-to-node tunnel -> node2 proxy -> server pod on node2",
             "bench/cli", Target(VIP_NODE2, 80), Target(VIP_NODE2, configs.H2C_PORT), Target(VIP_NODE2, configs.BULK_PORT),
             proxies=("agent/node1", "agent/node2"), direct="direct-cross-node", sidecar="sidecar-pair-cross-node", tags=("nodemesh",)),
    Scenario("nodemesh-same-node-no-sockmap", "nodemesh-same-node with the sockmap shortcut off (pod <-> proxy bytes through TCP)",
             "bench/cli", Target(VIP_NODE1, 80), Target(VIP_NODE1, configs.H2C_PORT), Target(VIP_NODE1, configs.BULK_PORT),
             proxies=("agent/node1",), tags=("nodemesh",), sockmap=False),
    Scenario("nodemesh-cross-node-no-sockmap", "nodemesh-cross-node with the sockmap shortcut off", "bench/cli",
             Target(VIP_NODE2, 80), Target(VIP_NODE2, configs.H2C_PORT), Target(VIP_NODE2, configs.BULK_PORT),
             proxies=("agent/node1", "agent/node2"), direct="direct-cross-node", sidecar="sidecar-pair-cross-node",
             tags=("nodemesh",), sockmap=False),
    Scenario("sidecar-pair", "iptables -> client haproxy sidecar -> TLS 1.3 mTLS -> server haproxy sidecar -> app (same node)",
             "plain/scli-1", _pod("plain/ssrv-1", configs.HTTP_PORT), _pod("plain/ssrv-1", configs.H2C_PORT),
             _pod("plain/ssrv-1", configs.BULK_PORT), proxies=("sidecar/scli-1", "sidecar/ssrv-1"), tags=("model",)),
    Scenario("sidecar-pair-cross-node", "the sidecar-pair model with the server pod on node2", "plain/scli-2",
             _pod("plain/ssrv-2", configs.HTTP_PORT), _pod("plain/ssrv-2", configs.H2C_PORT), _pod("plain/ssrv-2", configs.BULK_PORT),
             proxies=("sidecar/scli-2", "sidecar/ssrv-2"), direct="direct-cross-node", sidecar="sidecar-pair-cross-node", tags=("model",)),
    Scenario("haproxy-hop", "client pod -> one haproxy (HTTP mode, pooled upstream) in a pod -> server pod", "plain/pcli",
             _pod("plain/hop", configs.HAPROXY_HOP_HTTP), _pod("plain/hop", configs.HAPROXY_HOP_H2), _pod("plain/hop", configs.HAPROXY_HOP_BULK),
             proxies=("hop/haproxy",), tags=("peer",)),
    Scenario("nginx-hop", "client pod -> one nginx reverse proxy (pooled upstream) in a pod -> server pod (no stream module: no bulk)",
             "plain/pcli", _pod("plain/hop", configs.NGINX_HOP_HTTP), _pod("plain/hop", configs.NGINX_HOP_H2), None,
             proxies=("hop/nginx",), tags=("peer",)),
)

BY_NAME = {s.name: s for s in SCENARIOS}


def select(names: tuple[str, ...] | list[str]) -> list[Scenario]:
    """The named scenarios in their canonical order (all of them for no names); unknown names are an error."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [s for s in SCENARIOS if not names or s.name in names]
