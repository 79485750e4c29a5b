"""The effective policy (controller/policy.py) and the decision (nodemesh/authz.py), table-driven."""

from __future__ import annotations

import pytest

from nodemesh.authz import ClientInfo, NodePolicy, authorize
from nodemesh.controller.policy import node_policy, with_policy
from nodemesh.model import ClusterState, key_of, parse_documents
from nodemesh.nodeconfig import NodeConfig
from tests import objects_yaml as y

CLIENT = "spiffe://cluster.local/ns/demo/sa/client"
OTHER = "spiffe://cluster.local/ns/demo/sa/other"
FOREIGN = "spiffe://cluster.local/ns/ops/sa/prober"


def cluster(ns_default: str = "", pod_default: str = "", policies: str = "", validate: bool = True) -> ClusterState:
    def hello(name: str, node: str, ip: str, annotations: dict[str, str] | None = None) -> str:
        return y.pod(name, node=node, sa="hello", ip=ip, port=8080, port_name="http", labels={"app": "hello"}, annotations=annotations)

    text = (y.node("node1", "10.244.1.0/24", "172.31.255.11") + y.node("node2", "10.244.2.0/24")
            + y.meshed_namespace("demo", ns_default) + y.meshed_namespace("ops") + y.service_account("client")
            + hello("hello-1", "node1", "10.244.1.2", {"config.nodemesh.io/default-inbound-policy": pod_default} if pod_default else None)
            + hello("hello-2", "node2", "10.244.2.2"))
    objs = parse_documents(text + policies, "t.yaml")
    if not validate:  # HTTPRoute is the L7 issue's kind: route-targeted policies are built unchecked here
        return ClusterState(objects={key_of(o): o for o in objs})
    return ClusterState().apply(objs, "t.yaml")


ALLOW_CLIENT = y.server("hello-http", "hello", "http", "HTTP/1") + y.allow_account("allow-client", "Server", "hello-http", "client")

MESH_AND_NET = """
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: Server
metadata: {name: hello-http, namespace: demo}
spec: {podSelector: {matchLabels: {app: hello}}, port: 8080}
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: ops-all, namespace: demo}
spec: {identityRefs: [{kind: Namespace, name: ops}]}
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: node-net, namespace: demo}
spec: {networks: [{cidr: 10.244.1.0/24, except: [10.244.1.66/32]}]}
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ops-from-node1, namespace: demo}
spec:
  targetRef: {kind: Namespace, name: demo}
  requiredAuthenticationRefs: [{kind: MeshTLSAuthentication, name: ops-all}, {kind: NetworkAuthentication, name: node-net}]
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: anywhere, namespace: demo}
spec: {networks: [{cidr: 0.0.0.0/0}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: hello, namespace: demo}
"""

ROUTE_ONLY = (y.server("hello-http", "hello", 8080, "HTTP/1") + y.allow_account("allow-client", "Server", "hello-http", "client")
              + y.allow_account("other-on-health", "HTTPRoute", "health", "default"))

ADMIT_AUTHENTICATED = (y.server("hello-http", "hello", "http", "HTTP/1", access_policy="all-authenticated")
                       + y.allow_account("allow-client", "Server", "hello-http", "client"))
DEFAULT = "spiffe://cluster.local/ns/demo/sa/default"


# (case, state kwargs, cluster default, client identity, client ip, port, allowed, server_name, authz_name, words)
CASES = [
    ("no policy: cluster default allows", {}, "all-unauthenticated", None, "192.0.2.1", 8080, True, "all-unauthenticated", "all-unauthenticated", "cluster default"),
    ("cluster deny", {}, "deny", CLIENT, "10.244.1.3", 8080, False, "deny", "", "allows no client"),
    ("namespace deny beats cluster allow", {"ns_default": "deny"}, "all-unauthenticated", CLIENT, "10.244.1.3", 8080, False, "deny", "", "annotation on namespace demo"),
    ("pod beats namespace", {"ns_default": "deny", "pod_default": "all-authenticated"}, "deny", CLIENT, "192.0.2.1", 8080, True, "all-authenticated", "all-authenticated", "annotation on pod demo/hello-1"),
    ("all-authenticated refuses unmeshed", {"ns_default": "all-authenticated"}, "deny", None, "10.244.1.3", 8080, False, "all-authenticated", "", "meshed"),
    ("cluster-unauthenticated inside", {"ns_default": "cluster-unauthenticated"}, "deny", None, "10.244.2.9", 8080, True, "cluster-unauthenticated", "cluster-unauthenticated", "allows it"),
    ("cluster-unauthenticated node ip", {"ns_default": "cluster-unauthenticated"}, "deny", None, "172.31.255.11", 8080, True, "cluster-unauthenticated", "cluster-unauthenticated", "allows it"),
    ("cluster-unauthenticated outside", {"ns_default": "cluster-unauthenticated"}, "deny", None, "192.0.2.1", 8080, False, "cluster-unauthenticated", "", "cluster networks"),
    ("cluster-authenticated needs both", {"ns_default": "cluster-authenticated"}, "deny", CLIENT, "192.0.2.1", 8080, False, "cluster-authenticated", "", "cluster networks"),
    ("server: allowed SA", {"ns_default": "deny", "policies": ALLOW_CLIENT}, "deny", CLIENT, "10.244.1.3", 8080, True, "hello-http", "allow-client", "allowed by AuthorizationPolicy allow-client"),
    ("server: other SA", {"ns_default": "deny", "policies": ALLOW_CLIENT}, "deny", OTHER, "10.244.1.3", 8080, False, "hello-http", "", OTHER),
    ("server: unmeshed", {"ns_default": "all-unauthenticated", "policies": ALLOW_CLIENT}, "all-unauthenticated", None, "10.244.1.3", 8080, False, "hello-http", "", "unauthenticated client"),
    ("server covers one port only", {"ns_default": "deny", "policies": ALLOW_CLIENT}, "deny", CLIENT, "10.244.1.3", 9090, False, "deny", "", "default policy deny"),
    ("namespace policy: id and net", {"policies": MESH_AND_NET}, "deny", FOREIGN, "10.244.1.7", 8080, True, "hello-http", "ops-from-node1", "allowed"),
    ("namespace policy: wrong net", {"policies": MESH_AND_NET}, "deny", FOREIGN, "10.244.2.7", 8080, False, "hello-http", "", "is not in 10.244.1.0/24"),
    ("namespace policy: excepted ip", {"policies": MESH_AND_NET}, "deny", FOREIGN, "10.244.1.66", 8080, False, "hello-http", "", "is not in"),
    ("namespace policy: wrong identity", {"policies": MESH_AND_NET}, "deny", CLIENT, "10.244.1.7", 8080, False, "hello-http", "", "is not one of spiffe://cluster.local/ns/ops/sa/*"),
    ("server accessPolicy admits the unmatched", {"policies": ADMIT_AUTHENTICATED},
     "deny", OTHER, "10.244.1.3", 8080, True, "hello-http", "all-authenticated", "accessPolicy of Server hello-http"),
    ("server accessPolicy still needs its condition", {"policies": ADMIT_AUTHENTICATED},
     "deny", None, "10.244.1.3", 8080, False, "hello-http", "", "no AuthorizationPolicy"),
    ("route policy does not open the connection", {"policies": ROUTE_ONLY, "validate": False}, "deny", DEFAULT, "10.244.1.7", 8080, False, "hello-http", "", "no AuthorizationPolicy"),
]


@pytest.mark.parametrize("case, kw, cdef, ident, ip, port, allowed, server, authz, words", CASES, ids=[c[0] for c in CASES])
def test_decision_table(case, kw, cdef, ident, ip, port, allowed, server, authz, words):
    policy = NodePolicy.from_dict(node_policy(cluster(**kw), "node1", cdef).to_dict())  # through the wire form
    d = authorize(policy, ClientInfo(ident, ip), "demo", "hello-1", port)
    assert (d.allowed, d.server_name, d.authz_name) == (allowed, server, authz), d.reason
    assert words in d.reason, d.reason


def test_route_policy_applies_per_request():
    policy = node_policy(cluster(policies=ROUTE_ONLY, validate=False), "node1")
    assert authorize(policy, ClientInfo(DEFAULT, "10.244.1.7"), "demo", "hello-1", 8080, http_route="health").authz_name == "other-on-health"
    assert not authorize(policy, ClientInfo(DEFAULT, "10.244.1.7"), "demo", "hello-1", 8080, http_route="api").allowed
    assert authorize(policy, ClientInfo(CLIENT, "10.244.1.7"), "demo", "hello-1", 8080, http_route="api").authz_name == "allow-client"


def test_policy_lists_only_local_pods_and_denies_unknown_ones():
    policy = node_policy(cluster(), "node1")
    assert [p.name for p in policy.pods] == ["hello-1"]
    d = authorize(policy, ClientInfo(CLIENT, "10.244.1.3"), "demo", "hello-2", 8080)
    assert not d.allowed and "pod not in the node's policy" in d.reason


def test_absent_section_allows_as_before_policy_existed():
    d = authorize(NodePolicy.from_extra({}), ClientInfo(None, "192.0.2.1"), "demo", "x", 80)
    assert d.allowed


def test_rides_in_nodeconfig_extra_round_trip():
    st = cluster(ns_default="deny", policies=ALLOW_CLIENT)
    cfg = with_policy(NodeConfig(version=3, node="node1"), st, "all-unauthenticated")
    back = NodeConfig.from_dict(__import__("json").loads(__import__("json").dumps(cfg.to_dict())))
    assert NodePolicy.from_extra(back.extra) == node_policy(st, "node1")


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["pods"][0].update(default="allow-everything"), "unknown default policy"),
    (lambda d: d["pods"][0]["servers"][0].update(port=0), "not in 1..65535"),
    (lambda d: d.update(cluster_networks=["10.0.0.300/8"]), "does not appear to be"),
    (lambda d: d["pods"][0].pop("ip"), "ip"),
])
def test_malformed_wire_section_raises(mutate, words):
    d = node_policy(cluster(policies=ALLOW_CLIENT), "node1").to_dict()
    mutate(d)
    with pytest.raises((KeyError, TypeError, ValueError), match=words):
        NodePolicy.from_dict(d)
