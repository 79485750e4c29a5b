"""Model parsing: every error names the source, the object and the field; apply is all-or-nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import nodemesh
from nodemesh.errors import ConfigError
from nodemesh.model import ClusterState, Pod, is_meshed, load_file, parse_documents

from .config_errors import assert_config_error

NODES = """
apiVersion: v1
kind: Node
metadata: {name: node1}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo}
"""


def pod_doc(name: str = "p", node: str = "node1", ip: str | None = None) -> str:
    status = f"\nstatus: {{podIP: {ip}}}" if ip else ""
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
spec: {{nodeName: {node}, containers: [{{name: c}}]}}{status}
"""


@pytest.mark.parametrize("case, text, obj, field, words", [
    ("unknown kind", "apiVersion: v1\nkind: Deployment\nmetadata: {name: d}\n",
     "Deployment d", "kind", "unknown kind 'Deployment'"),
    ("service without ports", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {selector: {a: b}}\n",
     "Service demo/s", "spec.ports", "is required"),
    ("service with empty ports", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: []}\n",
     "Service demo/s", "spec.ports", "at least one port"),
    ("bad cluster IP", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\n"
     "spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n", "Service demo/s", "spec.clusterIP", "IPv4 address"),
    ("bad pod IP", pod_doc(ip="not-an-ip"), "Pod demo/p", "status.podIP", "IPv4 address"),
    ("port out of range", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 70000}]}\n",
     "Service demo/s", "spec.ports[0].port", "1-65535"),
    ("pod without node", "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {containers: []}\n",
     "Pod demo/p", "spec.nodeName", "is required"),
])
def test_parse_errors_name_source_object_field(case, text, obj, field, words):
    e = assert_config_error(lambda: parse_documents(text, "lab/objects.yaml"), "lab/objects.yaml", obj, field, words)
    assert str(e).startswith("lab/objects.yaml, "), case


def test_invalid_yaml_names_the_source():
    with pytest.raises(ConfigError, match=r"^bad\.yaml: is not valid YAML"):
        parse_documents("kind: [unclosed", "bad.yaml")


def test_pod_on_missing_node_names_node_and_field():
    base = ClusterState().apply(parse_documents(NODES, "nodes.yaml"))
    assert_config_error(lambda: base.apply(parse_documents(pod_doc(node="node9"), "pods.yaml"), source="pods.yaml"),
                        "pods.yaml", "Pod demo/p", "spec.nodeName", "node 'node9' does not exist (nodes: node1)")


def test_apply_failure_leaves_state_unchanged():
    base = ClusterState().apply(parse_documents(NODES + "---" + pod_doc("ok"), "a.yaml"))
    before = dict(base.objects)
    with pytest.raises(ConfigError):
        base.apply(parse_documents(pod_doc("new") + "---" + pod_doc("bad", node="node9"), "b.yaml"))
    assert dict(base.objects) == before
    assert base.get("Pod", "demo", "new") is None


def test_duplicate_address_rejected():
    docs = parse_documents(NODES + "---" + pod_doc("a", ip="10.244.1.2") + "---" + pod_doc("b", ip="10.244.1.2"), "x.yaml")
    with pytest.raises(ConfigError, match="already used by Pod demo/a"):
        ClusterState().apply(docs)


def test_node_name_is_immutable():
    two_nodes = NODES + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node2}\n"
    base = ClusterState().apply(parse_documents(two_nodes + "---" + pod_doc(), "a.yaml"))
    with pytest.raises(ConfigError) as err:
        base.apply(parse_documents(pod_doc(node="node2"), "b.yaml"), source="b.yaml")
    assert err.value.field == "spec.nodeName" and "immutable" in str(err.value)
    assert base.get("Pod", "demo", "p").node_name == "node1"


def test_update_without_ip_keeps_assigned_ip():
    base = ClusterState().apply(parse_documents(NODES + "---" + pod_doc(ip="10.244.1.9"), "a.yaml"))
    after = base.apply(parse_documents(pod_doc(), "a.yaml"))
    assert after.get("Pod", "demo", "p").pod_ip == "10.244.1.9"


def test_default_lab_parses_and_validates():
    path = Path(nodemesh.__file__).parent / "labs" / "default.yaml"
    state = ClusterState().apply(load_file(str(path)), source=str(path))
    assert [n.name for n in state.nodes] == ["node1", "node2"]
    assert all(n.internal_ip is None for n in state.nodes)  # the lab assigns addresses
    demo = state.get("Namespace", "", "demo")
    assert demo.labels == {"nodemesh.io/mesh": "enabled"}
    assert {o.name for o in state.of_kind("ServiceAccount")} == {"hello", "client"}
    (hello,) = state.services
    assert (hello.cluster_ip, hello.selector) == ("10.96.0.10", {"app": "hello"})
    assert [(p.name, p.port, p.target_port) for p in hello.ports] == [("http", 80, 8080)]
    pods = {p.name: p for p in state.pods}
    assert {n: p.node_name for n, p in pods.items()} == {"hello-1": "node1", "hello-2": "node2", "client": "node1"}
    for name in ("hello-1", "hello-2"):
        p: Pod = pods[name]
        assert (p.labels["app"], p.service_account) == ("hello", "hello")
        (c,) = p.containers
        assert c.command == ("nodemesh", "sample-server", "--port", "8080")
        assert [(cp.container_port, cp.name) for cp in c.ports] == [(8080, "http")]
    assert pods["client"].service_account == "client"
    assert pods["client"].containers[0].command == ("sleep", "infinity")
    assert all(is_meshed(p, demo) for p in pods.values())
