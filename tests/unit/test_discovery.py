"""Discovery is pure: table-style cases from a ClusterState to endpoints and node configs."""

from __future__ import annotations

import pytest

from nodemesh.controller.discovery import endpoints_for, node_config
from nodemesh.model import (
    ClusterState, Container, ContainerPort, Namespace, Node, Pod, Service, ServicePort,
)

MESHED = {"nodemesh.io/mesh": "enabled"}


def pod(name: str, ip: str | None = "10.244.1.2", labels: dict | None = None, ns: str = "demo",
        node: str = "node1", sa: str = "web", ports: tuple[tuple[int, str], ...] = ((8080, "http"),)) -> Pod:
    return Pod(namespace=ns, name=name, node_name=node, service_account=sa,
               labels={"app": "web"} if labels is None else labels, pod_ip=ip,
               containers=(Container(name="c", ports=tuple(ContainerPort(p, n) for p, n in ports)),))


def svc(selector: dict | None = None, ports: tuple[ServicePort, ...] = (ServicePort(80, 8080, "http"),),
        ns: str = "demo", name: str = "web", ip: str | None = "10.96.0.10") -> Service:
    return Service(namespace=ns, name=name, cluster_ip=ip, ports=ports,
                   selector={"app": "web"} if selector is None else selector)


def state(*objs, trust_domain: str = "cluster.local") -> ClusterState:
    base = (Node("node1", "192.168.0.1", "10.244.1.0/24"), Node("node2", "192.168.0.2", "10.244.2.0/24"),
            Namespace("demo", labels=MESHED), Namespace("plain"))
    return ClusterState(trust_domain=trust_domain).apply(base + objs)


def names(eps) -> list[str]:
    return [e.pod for e in eps]


@pytest.mark.parametrize("case, service, pods, expected", [
    ("selector matches", svc(), [pod("a", "10.244.1.2"), pod("b", "10.244.1.3")], ["a", "b"]),
    ("selector must match all labels", svc({"app": "web", "tier": "fe"}),
     [pod("a", "10.244.1.2", {"app": "web", "tier": "fe"}), pod("b", "10.244.1.3")], ["a"]),
    ("label value differs", svc(), [pod("a", labels={"app": "api"})], []),
    ("empty selector selects nothing", svc({}), [pod("a")], []),
    ("other namespace excluded", svc(), [pod("a", ns="plain", labels={"app": "web", **MESHED})], []),
    ("pod without IP excluded", svc(), [pod("a", None), pod("b", "10.244.1.3")], ["b"]),
    ("non-meshed namespace excluded", svc(ns="plain"), [pod("a", ns="plain")], []),
    ("pod label opts in within a plain namespace", svc(ns="plain"),
     [pod("a", ns="plain", labels={"app": "web", **MESHED})], ["a"]),
    ("pod label opts out within a meshed namespace", svc(),
     [pod("a", labels={"app": "web", "nodemesh.io/mesh": "disabled"})], []),
])
def test_endpoint_selection(case, service, pods, expected):
    (eps,) = endpoints_for(state(service, *pods), service)
    assert names(eps) == expected, case


@pytest.mark.parametrize("case, target, pod_ports, expected_port", [
    ("numeric targetPort", 9000, ((8080, "http"),), 9000),
    ("named targetPort resolves", "http", ((9090, "metrics"), (8080, "http")), 8080),
    ("named targetPort missing: no endpoint", "grpc", ((8080, "http"),), None),
])
def test_target_port(case, target, pod_ports, expected_port):
    service = svc(ports=(ServicePort(80, target, "http"),))
    (eps,) = endpoints_for(state(service, pod("a", ports=pod_ports)), service)
    assert [e.port for e in eps] == ([expected_port] if expected_port else []), case


def test_named_target_port_skips_only_pods_lacking_the_name():
    service = svc(ports=(ServicePort(80, "http", "http"),))
    s = state(service, pod("old", "10.244.1.2", ports=((8080, "web"),)), pod("new", "10.244.1.3", ports=((8081, "http"),)))
    (eps,) = endpoints_for(s, service)
    assert [(e.pod, e.port) for e in eps] == [("new", 8081)]


def test_multi_port_service_keeps_port_order():
    service = svc(ports=(ServicePort(80, "http", "http"), ServicePort(9090, 9091, "metrics")))
    s = state(service, pod("a", ports=((8080, "http"),)))
    http, metrics = endpoints_for(s, service)
    assert [e.port for e in http] == [8080]
    assert [e.port for e in metrics] == [9091]
    cfg = node_config(s, "node1", 7)
    (view,) = cfg.services
    assert [(p.port, p.name, [e.port for e in p.endpoints]) for p in view.ports] == [(80, "http", [8080]), (9090, "metrics", [9091])]


def test_endpoint_fields_and_identity():
    s = state(svc(), pod("a", "10.244.2.5", node="node2", sa="web-sa"), trust_domain="example.org")
    (eps,) = endpoints_for(s, svc())
    (e,) = eps
    assert (e.namespace, e.pod, e.ip, e.port, e.node) == ("demo", "a", "10.244.2.5", 8080, "node2")
    assert e.identity == "spiffe://example.org/ns/demo/sa/web-sa"


def test_node_config_contents():
    s = state(
        Node("node3"),  # not yet addressed: not routable, so not listed
        svc(), svc(name="headless", ip=None),
        pod("a", "10.244.1.2"), pod("b", None),
        pod("c", "10.244.1.4", ns="plain", labels={}),
    )
    cfg = node_config(s, "node2", 3)
    assert (cfg.version, cfg.node, cfg.trust_domain) == (3, "node2", "cluster.local")
    assert [(n.name, n.internal_ip, n.pod_cidr) for n in cfg.nodes] == [
        ("node1", "192.168.0.1", "10.244.1.0/24"), ("node2", "192.168.0.2", "10.244.2.0/24")]
    assert [(v.name, v.cluster_ip) for v in cfg.services] == [("web", "10.96.0.10")]
    assert [(p.name, p.ip, p.node, p.identity) for p in cfg.pods] == [
        ("a", "10.244.1.2", "node1", "spiffe://cluster.local/ns/demo/sa/web")]
    assert cfg.local_pods() == ()
    assert node_config(s, "node1", 3).local_pods() == cfg.pods


def test_deterministic_regardless_of_insertion_order():
    objs = [svc(), svc(name="api", ip="10.96.0.11", selector={"app": "api"}),
            pod("b", "10.244.1.3"), pod("a", "10.244.1.2"), pod("c", "10.244.1.4", labels={"app": "api"})]
    one = node_config(state(*objs), "node1", 1)
    two = node_config(state(*reversed(objs)), "node1", 1)
    assert one == two and one.to_dict() == two.to_dict()
    assert [s.name for s in one.services] == ["api", "web"]
    assert [e.pod for e in one.services[1].ports[0].endpoints] == ["a", "b"]
