import pytest

from nodemesh.errors import ConfigError
from nodemesh.lab.lab import _place
from nodemesh.lab.state import LabState
from nodemesh.lab.topology import NODE_NETNS_PREFIX, POD_NETNS_PREFIX, UNDERLAY_NET, UNDERLAY_VETH_PREFIX, NodeAddressing, PodAddressing, next_free

U = str(UNDERLAY_NET.network_address)[:-1]  # '172.31.255.' for lab instance 0
from nodemesh.model import ClusterState, parse_documents

LAB = """
apiVersion: v1
kind: Node
metadata: {name: b}
---
apiVersion: v1
kind: Node
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p1}
spec: {nodeName: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p2}
spec: {nodeName: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p3}
spec: {nodeName: b}
"""


def test_addressing() -> None:
    n = NodeAddressing("node1", 1)
    assert (n.netns, n.underlay_ip, n.pod_cidr, n.gateway_ip, n.underlay_veth) == (f"{NODE_NETNS_PREFIX}node1", f"{U}11", "10.244.1.0/24", "10.244.1.1", f"{UNDERLAY_VETH_PREFIX}1")
    p = PodAddressing("demo", "client", n, 4)
    assert (p.ip, p.netns, p.node_veth, p.cgroup_name) == ("10.244.1.4", f"{POD_NETNS_PREFIX}demo-client", "veth4", "demo_client")


def test_place_assigns_in_file_order_and_fills_addresses() -> None:
    state = LabState()
    placed = _place(state, parse_documents(LAB, "lab.yaml"), "lab.yaml")
    cluster = ClusterState().apply(placed)
    assert state.nodes == {"b": {"index": 1}, "a": {"index": 2}}
    ips = {p.name: p.pod_ip for p in cluster.pods}
    assert ips == {"p1": "10.244.2.2", "p2": "10.244.2.3", "p3": "10.244.1.2"}
    assert {n.name: n.internal_ip for n in cluster.nodes} == {"a": f"{U}12", "b": f"{U}11"}


def test_place_is_stable_across_applies() -> None:
    state = LabState()
    _place(state, parse_documents(LAB, "lab.yaml"), "lab.yaml")
    again = _place(state, parse_documents(LAB, "lab.yaml"), "lab.yaml")
    assert {o.name: getattr(o, "pod_ip", None) for o in again}["p2"] == "10.244.2.3"


def test_place_rejects_foreign_pod_ip_and_unknown_node() -> None:
    doc = "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: a}\nstatus: {podIP: 10.9.9.9}\n"
    with pytest.raises(ConfigError, match="status.podIP"):
        _place(LabState(), parse_documents(doc, "x.yaml"), "x.yaml")
    with pytest.raises(ConfigError, match="spec.nodeName"):
        _place(LabState(), parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: zz}\n", "x.yaml"), "x.yaml")


def test_next_free() -> None:
    assert next_free({2, 3}, 2, 10, "pod") == 4
    with pytest.raises(ValueError, match="no free pod"):
        next_free({2}, 2, 2, "pod")


def test_bridge_macs_are_fixed_unicast_and_distinct() -> None:
    from nodemesh.lab.network import bridge_mac

    macs = {bridge_mac(i, n) for i in range(10) for n in range(0, 201)}
    assert len(macs) == 10 * 201
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)  # locally administered, unicast
