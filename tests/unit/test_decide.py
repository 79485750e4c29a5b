"""decide(): the routing decision as data. No sockets; the table reads like the routing rules."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace

import pytest

from nodemesh.agent.balance import RoundRobin
from nodemesh.agent.decide import DstLabels, Plan, decide
from nodemesh.agent.handshake import TunnelRequest
from nodemesh.agent.workloads import NodeView
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

SA = "spiffe://cluster.local/ns/{}/sa/{}"


def pod(name: str, ip: str, node: str, ns: str = "default") -> WorkloadPod:
    return WorkloadPod(ns, name, ip, node, name.split("-")[0], SA.format(ns, name.split("-")[0]))


def ep(p: WorkloadPod, port: int) -> Endpoint:
    return Endpoint(p.namespace, p.name, p.ip, port, p.node, p.identity)


WEB1 = pod("web-1", "10.244.1.10", "node1")
WEB2 = pod("web-2", "10.244.2.10", "node2")
CLIENT = pod("client-1", "10.244.1.20", "node1")
DB = pod("db-1", "10.244.2.30", "node2", ns="data")
GHOST = pod("ghost-1", "10.244.7.7", "node7")  # on a node the config does not describe

CONFIG = NodeConfig(
    version=3,
    node="node1",
    nodes=(NodeInfo("node1", "172.18.0.1", "10.244.1.0/24"), NodeInfo("node2", "172.18.0.2", "10.244.2.0/24", 14143)),
    services=(
        ServiceView("default", "web", "10.96.0.10", (ServicePortView(80, "http", "TCP", (ep(WEB1, 8080), ep(WEB2, 8080))),)),
        ServiceView("data", "db", "10.96.0.20", (ServicePortView(5432, "pg", "TCP", (ep(DB, 5432),)),)),
        ServiceView("default", "empty", "10.96.0.30", (ServicePortView(80),)),
        ServiceView("default", "lost", "10.96.0.40", (ServicePortView(80, endpoints=(ep(GHOST, 80),)),)),
    ),
    pods=(WEB1, WEB2, CLIENT, DB, GHOST),
)
VIEW = NodeView.from_config(CONFIG)


class First:
    """Balancer stub: always the first endpoint, and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, tuple[Endpoint, ...]]] = []

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint]) -> Endpoint:
        self.calls.append((key, tuple(endpoints)))
        return endpoints[0]


CLIENT_ID = CLIENT.identity
WEB = "web.default.svc.cluster.local:80"

CASES = [
    # id, source ip, original destination, expected plan
    (
        "vip -> local endpoint",
        CLIENT.ip,
        ("10.96.0.10", 80),
        Plan("local", DstLabels("default", "web", "web-1", WEB), ep(WEB1, 8080), ("10.244.1.10", 8080), CLIENT_ID),
    ),
    (
        "vip -> remote endpoint via the node's inbound port",
        CLIENT.ip,
        ("10.96.0.20", 5432),
        Plan(
            "remote",
            DstLabels("data", "db", "db-1", "db.data.svc.cluster.local:5432"),
            ep(DB, 5432),
            ("172.18.0.2", 14143),
            CLIENT_ID,
            TunnelRequest("10.244.2.30", 5432, CLIENT_ID, "data/db-1"),
        ),
    ),
    (
        "pod ip dialed directly, local",
        CLIENT.ip,
        ("10.244.1.10", 9000),
        Plan("local", DstLabels("default", "", "web-1", "10.244.1.10:9000"), ep(WEB1, 9000), ("10.244.1.10", 9000), CLIENT_ID),
    ),
    (
        "pod ip dialed directly, remote",
        CLIENT.ip,
        ("10.244.2.10", 8080),
        Plan(
            "remote",
            DstLabels("default", "", "web-2", "10.244.2.10:8080"),
            ep(WEB2, 8080),
            ("172.18.0.2", 14143),
            CLIENT_ID,
            TunnelRequest("10.244.2.10", 8080, CLIENT_ID, "default/web-2"),
        ),
    ),
    (
        "unmeshed source has no identity",
        "10.244.1.99",
        ("10.244.1.10", 8080),
        Plan("local", DstLabels("default", "", "web-1", "10.244.1.10:8080"), ep(WEB1, 8080), ("10.244.1.10", 8080), None),
    ),
    (
        "a remote pod's IP as source is not a local identity",
        WEB2.ip,
        ("10.244.1.10", 8080),
        Plan("local", DstLabels("default", "", "web-1", "10.244.1.10:8080"), ep(WEB1, 8080), ("10.244.1.10", 8080), None),
    ),
]


@pytest.mark.parametrize("source,orig,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plans(source: str, orig: tuple[str, int], expected: Plan) -> None:
    assert decide(VIEW, source, orig, First()) == expected


REJECTS = [
    # id, original destination, words in the reason
    ("service without endpoints", ("10.96.0.30", 80), "no endpoints for service default/empty port 80"),
    ("endpoints only on unknown nodes", ("10.96.0.40", 80), "no endpoints on known nodes for service default/lost"),
    ("pod on an unknown node", (GHOST.ip, 80), "node 'node7'"),
    ("vip with an unknown port", ("10.96.0.10", 81), "service 10.96.0.10 has no port 81"),
    ("not meshed at all", ("8.8.8.8", 53), "8.8.8.8:53 is not a meshed destination in config version 3"),
]


@pytest.mark.parametrize("orig,words", [c[1:] for c in REJECTS], ids=[c[0] for c in REJECTS])
def test_rejects(orig: tuple[str, int], words: str) -> None:
    plan = decide(VIEW, CLIENT.ip, orig, First())
    assert plan.kind == "reject" and words in plan.reason
    assert plan.connect is None and plan.tunnel is None
    assert plan.src_identity == CLIENT_ID


def test_balancer_gets_service_port_key_and_usable_endpoints() -> None:
    lost_and_found = replace(
        CONFIG,
        services=(ServiceView("default", "web", "10.96.0.10", (ServicePortView(80, endpoints=(ep(GHOST, 80), ep(WEB2, 8080))),)),),
    )
    b = First()
    plan = decide(NodeView.from_config(lost_and_found), CLIENT.ip, ("10.96.0.10", 80), b)
    assert b.calls == [(("default", "web", 80), (ep(WEB2, 8080),))]  # the unreachable one is left out
    assert plan.kind == "remote" and plan.target == ep(WEB2, 8080)


def test_no_balancer_call_for_pod_ip_or_reject() -> None:
    b = First()
    decide(VIEW, CLIENT.ip, (WEB1.ip, 80), b)
    decide(VIEW, CLIENT.ip, ("10.96.0.30", 80), b)
    assert b.calls == []


def test_round_robin_spreads_over_endpoints() -> None:
    rr = RoundRobin()
    picks = [decide(VIEW, CLIENT.ip, ("10.96.0.10", 80), rr).target.pod for _ in range(4)]
    assert picks == ["web-1", "web-2", "web-1", "web-2"]
    assert {decide(VIEW, CLIENT.ip, ("10.96.0.10", 80), rr).kind for _ in range(2)} == {"local", "remote"}


def test_round_robin_keys_are_independent_and_retained() -> None:
    rr = RoundRobin()
    a, b = ep(WEB1, 1), ep(WEB2, 1)
    assert [rr.pick("x", [a, b]).pod, rr.pick("y", [a, b]).pod, rr.pick("x", [a, b]).pod] == ["web-1", "web-1", "web-2"]
    rr.retain(["y"])
    assert rr.pick("x", [a, b]).pod == "web-1"  # forgotten, starts over
    with pytest.raises(ValueError):
        rr.pick("x", [])


def test_empty_view_rejects_everything() -> None:
    plan = decide(NodeView.empty("node1"), CLIENT.ip, ("10.96.0.10", 80), First())
    assert plan.kind == "reject" and "not a meshed destination" in plan.reason and plan.src_identity is None
