"""NodeView: the index the data path reads, built from one NodeConfig."""

from __future__ import annotations

import pytest

from nodemesh.agent.workloads import NodeView
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod


def pod(name: str, ip: str, node: str, ns: str = "default") -> WorkloadPod:
    return WorkloadPod(ns, name, ip, node, name.split("-")[0], f"spiffe://cluster.local/ns/{ns}/sa/{name.split('-')[0]}")


def ep(p: WorkloadPod, port: int) -> Endpoint:
    return Endpoint(p.namespace, p.name, p.ip, port, p.node, p.identity)


WEB1 = pod("web-1", "10.244.1.10", "node1")
WEB2 = pod("web-2", "10.244.2.10", "node2")
CLIENT = pod("client-1", "10.244.1.20", "node1")
DB = pod("db-1", "10.244.2.30", "node2", ns="data")

CONFIG = NodeConfig(
    version=7,
    node="node1",
    nodes=(NodeInfo("node1", "172.18.0.1", "10.244.1.0/24"), NodeInfo("node2", "172.18.0.2", "10.244.2.0/24", 14143)),
    services=(
        ServiceView("default", "web", "10.96.0.10", (ServicePortView(80, "http", "TCP", (ep(WEB1, 8080), ep(WEB2, 8080))), ServicePortView(443, "https"))),
        ServiceView("data", "db", "10.96.0.20", (ServicePortView(5432, "pg", "TCP", (ep(DB, 5432),)),)),
        ServiceView("default", "headless", "None", (ServicePortView(80),)),
    ),
    pods=(WEB1, WEB2, CLIENT, DB),
)


@pytest.fixture
def view() -> NodeView:
    return NodeView.from_config(CONFIG)


def test_service_ports_by_vip_and_port(view: NodeView) -> None:
    t = view.service_port("10.96.0.10", 80)
    assert t is not None and t.service.name == "web" and t.port.port == 80 and len(t.port.endpoints) == 2
    assert t.key == ("default", "web", 80)
    assert view.service_port("10.96.0.10", 443).port.endpoints == ()
    assert view.service_port("10.96.0.10", 81) is None
    assert view.service_port("10.96.0.99", 80) is None
    assert view.is_service_ip("10.96.0.20") and not view.is_service_ip("10.244.1.10")


def test_pods_cluster_wide_and_local(view: NodeView) -> None:
    assert view.pod("10.244.2.10") == WEB2
    assert view.local_pod("10.244.2.10") is None
    assert view.local_pod("10.244.1.20") == CLIENT
    assert set(view.local_pods) == {"10.244.1.10", "10.244.1.20"}
    assert view.pod("10.244.9.9") is None


def test_nodes(view: NodeView) -> None:
    assert view.node_info("node2").inbound_port == 14143
    assert view.node_info("node3") is None
    assert (view.node, view.version) == ("node1", 7)


def test_meshed_destinations(view: NodeView) -> None:
    assert view.meshed_destinations() == {
        ("10.96.0.10", 80),
        ("10.96.0.10", 443),
        ("10.96.0.20", 5432),
        ("10.244.1.10", 0),
        ("10.244.2.10", 0),
        ("10.244.1.20", 0),
        ("10.244.2.30", 0),
    }  # the headless service has no VIP: clients dial its pods, which are meshed by IP


def test_empty_view_knows_nothing() -> None:
    v = NodeView.empty("node1")
    assert v.meshed_destinations() == frozenset() and v.pod("10.244.1.10") is None and v.version == 0


def test_view_is_read_only(view: NodeView) -> None:
    with pytest.raises(TypeError):
        view.local_pods["10.0.0.1"] = CLIENT  # type: ignore[index]
    with pytest.raises(TypeError):
        view.service_ports[("1.1.1.1", 1)] = None  # type: ignore[index]


def test_view_survives_config_roundtrip() -> None:
    again = NodeView.from_config(NodeConfig.from_dict(CONFIG.to_dict()))
    assert again.meshed_destinations() == NodeView.from_config(CONFIG).meshed_destinations()
