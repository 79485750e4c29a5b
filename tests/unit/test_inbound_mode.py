"""Strict / permissive inbound mode (issue 4, fail closed): the annotation in the model, its
resolution by the controller (pod, then namespace, then permissive), the wire round trip, the pure
decision, and the agent-side counters and live re-checks (Authorizer)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.authz import ClientInfo, NodePolicy, PodPolicy, authorize, plaintext_decision
from nodemesh.controller.policy import node_policy, with_policy
from nodemesh.errors import ConfigError
from nodemesh.model import ClusterState, parse_documents
from nodemesh.nodeconfig import NodeConfig

ANN = "config.nodemesh.io/inbound-mode"


def cluster(ns_mode: str = "", pod_mode: str = "", ns_default: str = "") -> ClusterState:
    ns_ann = {k: v for k, v in ((ANN, ns_mode), ("config.nodemesh.io/default-inbound-policy", ns_default)) if v}
    pod_ann = {ANN: pod_mode} if pod_mode else {}
    text = f"""
apiVersion: v1
kind: Node
metadata: {{name: node1}}
spec: {{podCIDR: 10.244.1.0/24}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{nodemesh.io/mesh: enabled}}, annotations: {ns_ann}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: demo, annotations: {pod_ann}}}
spec: {{nodeName: node1, serviceAccountName: a}}
status: {{podIP: 10.244.1.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: b, namespace: demo}}
spec: {{nodeName: node1, serviceAccountName: b}}
status: {{podIP: 10.244.1.3}}
"""
    return ClusterState().apply(parse_documents(text, "t.yaml"), "t.yaml")


@pytest.mark.parametrize("kind, text, obj", [
    ("Namespace", f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, annotations: {{{ANN}: Strict}}}}\n", "Namespace demo"),
    ("Pod", f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: demo, annotations: {{{ANN}: enforce}}}}\nspec: {{nodeName: n}}\n", "Pod demo/p"),
])
def test_bad_annotation_names_object_and_field(kind: str, text: str, obj: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_documents(text, "p.yaml")
    e = err.value
    assert (e.source, e.obj, e.field) == ("p.yaml", obj, f"metadata.annotations.{ANN}")
    assert "unknown inbound mode" in str(e) and "permissive, strict" in str(e)


@pytest.mark.parametrize("ns_mode, pod_mode, want_a, want_b, source_a", [
    ("", "", "permissive", "permissive", "default"),
    ("strict", "", "strict", "strict", "annotation on namespace demo"),
    ("strict", "permissive", "permissive", "strict", "annotation on pod demo/a"),
    ("", "strict", "strict", "permissive", "annotation on pod demo/a"),
])
def test_resolution_pod_then_namespace_then_permissive(ns_mode: str, pod_mode: str, want_a: str, want_b: str, source_a: str) -> None:
    pol = node_policy(cluster(ns_mode, pod_mode), "node1")
    a, b = pol.pod("demo", "a"), pol.pod("demo", "b")
    assert a is not None and b is not None
    assert (a.inbound_mode, b.inbound_mode, a.inbound_mode_source) == (want_a, want_b, source_a)


def test_mode_rides_the_wire_and_a_bad_one_is_refused() -> None:
    state = cluster("strict")
    cfg = with_policy(NodeConfig(1, "node1"), state)
    back = NodePolicy.from_dict(NodeConfig.from_dict(cfg.to_dict()).extra["policy"])
    assert back == node_policy(state, "node1")
    broken = dict(cfg.extra["policy"])
    broken["pods"] = [dict(broken["pods"][0], inbound_mode="lenient")]
    with pytest.raises(ValueError, match="unknown inbound mode 'lenient'"):
        NodePolicy.from_dict(broken)
    legacy = dict(cfg.extra["policy"])  # a controller from before inbound modes: permissive
    legacy["pods"] = [{k: v for k, v in p.items() if not k.startswith("inbound_mode")} for p in legacy["pods"]]
    assert {p.inbound_mode for p in NodePolicy.from_dict(legacy).pods} == {"permissive"}


POD = PodPolicy("demo", "a", "10.244.1.2", default="all-unauthenticated")


@pytest.mark.parametrize("mode, allowed", [("permissive", True), ("strict", False)])
def test_plaintext_decision(mode: str, allowed: bool) -> None:
    pol = NodePolicy((replace(POD, inbound_mode=mode, inbound_mode_source="annotation on namespace demo"),))
    d = plaintext_decision(pol, "demo", "a", 8080)
    assert d.allowed is allowed
    if not allowed:
        assert "strict inbound mode (annotation on namespace demo)" in d.reason and "demo/a:8080" in d.reason


def test_strict_is_checked_before_the_policy_and_permissive_leaves_it_to_the_policy() -> None:
    """Composition: strict refuses plaintext even where the policy allows everyone; permissive
    passes plaintext on, and an all-authenticated default then refuses an unauthenticated client."""
    anyone = NodePolicy((replace(POD, inbound_mode="strict"),))
    client = ClientInfo(None, "10.0.0.9")
    assert authorize(anyone, client, "demo", "a", 8080).allowed  # the policy alone would allow it
    assert not plaintext_decision(anyone, "demo", "a", 8080).allowed
    authn_only = NodePolicy((replace(POD, default="all-authenticated"),))
    assert plaintext_decision(authn_only, "demo", "a", 8080).allowed
    assert not authorize(authn_only, client, "demo", "a", 8080).allowed


def test_unknown_pod_is_left_to_the_policy() -> None:
    pol = NodePolicy(unknown_pod="deny")
    assert plaintext_decision(pol, "demo", "ghost", 80).allowed
    assert not authorize(pol, ClientInfo(None, "10.0.0.9"), "demo", "ghost", 80).allowed


class _Conn:
    """A stand-in accepted transport whose protocol carries an authorized subject (as InboundConnection does)."""

    def __init__(self, subject: Subject) -> None:
        self.authz_subject = subject
        self.reset = False

    def get_protocol(self) -> _Conn:
        return self

    def is_closing(self) -> bool:
        return self.reset

    def abort(self) -> None:
        self.reset = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def test_authorizer_counts_and_cuts_live_plaintext_when_the_namespace_turns_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    import nodemesh.agent.authorizer as authorizer_mod

    monkeypatch.setattr(authorizer_mod, "reset_transport", lambda t: t.abort())
    authz = Authorizer()
    authz.apply(with_policy(NodeConfig(1, "node1"), cluster()), [])
    plain = Subject(ClientInfo(None, "10.244.2.9"), "demo", "a", "10.244.1.2", 8080, plaintext=True)
    meshed = Subject(ClientInfo("spiffe://cluster.local/ns/demo/sa/b", "10.244.1.3"), "demo", "a", "10.244.1.2", 8080)
    assert authz.check_plaintext(plain, "captured").allowed
    conns = [_Conn(plain), _Conn(meshed)]
    cut = authz.apply(with_policy(NodeConfig(2, "node1"), cluster("strict")), conns)  # type: ignore[arg-type]
    assert cut == 1 and conns[0].reset and not conns[1].reset  # same-node meshed traffic is not plaintext-from-off-mesh
    assert not authz.check_plaintext(plain, "inbound_port").allowed
    assert (authz.plaintext_count("allowed"), authz.plaintext_count("refused_strict", "inbound_port"), authz.plaintext_count("refused_strict", "captured")) == (1, 1, 0)
    text = "".join(str(m) for m in authz.collect())
    assert "nodemesh_inbound_plaintext" in text
