"""Policy objects (policy.nodemesh.io/v1alpha1): parsing, dumping, and every bad input named precisely."""

from __future__ import annotations

import pytest

from nodemesh.model import ClusterState, dump_object, parse_documents
from nodemesh.policy_model import AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication, Server

from .config_errors import assert_config_error

BASE = """
apiVersion: v1
kind: Node
metadata: {name: node1}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-1, namespace: demo, labels: {app: hello}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]}
"""

SERVER = """
apiVersion: policy.nodemesh.io/v1alpha1
kind: Server
metadata: {name: hello-http, namespace: demo}
spec: {podSelector: {matchLabels: {app: hello}}, port: http, proxyProtocol: HTTP/1}
"""
MESHTLS = """
apiVersion: policy.nodemesh.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: client-only, namespace: demo}
spec:
  identities: ["spiffe://cluster.local/ns/other/sa/*"]
  identityRefs: [{kind: ServiceAccount, name: client}]
"""
NETAUTH = """
apiVersion: policy.nodemesh.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: probes, namespace: demo}
spec: {networks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]}
"""
AUTHZ = """
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  targetRef: {group: policy.nodemesh.io, kind: Server, name: hello-http}
  requiredAuthenticationRefs: [{kind: MeshTLSAuthentication, name: client-only}]
"""


def state_of(*texts: str) -> ClusterState:
    return ClusterState().apply(parse_documents("\n---\n".join((BASE,) + texts), "p.yaml"), "p.yaml")


def test_parses_all_four_kinds_and_dumps_them_back():
    st = state_of(SERVER, MESHTLS, NETAUTH, AUTHZ)
    srv = st.get("Server", "demo", "hello-http")
    assert srv == Server("demo", "hello-http", {"app": "hello"}, "http", "HTTP/1")
    pol = st.get("AuthorizationPolicy", "demo", "allow-client")
    assert isinstance(pol, AuthorizationPolicy) and pol.target.kind == "Server" and pol.required[0].namespace == "demo"
    m = st.get("MeshTLSAuthentication", "demo", "client-only")
    assert isinstance(m, MeshTLSAuthentication) and m.identity_refs[0].namespace == "demo"
    n = st.get("NetworkAuthentication", "demo", "probes")
    assert isinstance(n, NetworkAuthentication) and n.networks[0].except_ == ("10.9.0.0/16",)
    for obj in (srv, pol, m, n):  # the lab writes objects back with dump_object: round trip exact
        assert parse_documents(__import__("yaml").safe_dump(dump_object(obj)), "x")[0] == obj


def _doc(kind: str, spec: str, name: str = "x") -> str:
    return f"apiVersion: policy.nodemesh.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"


def bad(case: str, kind: str, spec: str, field: str, words: str) -> tuple[str, str, str, str, str]:
    """A parse-error row: `kind` demo/x with `spec` is refused at `field`, saying `words`."""
    return (case, _doc(kind, spec), f"{kind} demo/x", field, words)


@pytest.mark.parametrize("case, text, obj, field, words", [
    bad("invalid CIDR", "NetworkAuthentication", "{networks: [{cidr: 10.0.0.300/8}]}", "spec.networks[0].cidr", "not a valid CIDR"),
    bad("CIDR with host bits", "NetworkAuthentication", "{networks: [{cidr: 10.0.0.1/8}]}", "spec.networks[0].cidr", "host bits set"),
    bad("invalid except CIDR", "NetworkAuthentication", "{networks: [{cidr: 10.0.0.0/8, except: [nope]}]}", "spec.networks[0].except[0]", "not a valid CIDR"),
    bad("no networks", "NetworkAuthentication", "{networks: []}", "spec.networks", "at least one"),
    bad("bad identity", "MeshTLSAuthentication", "{identities: [client]}", "spec.identities[0]", "is not an identity"),
    bad("no identities", "MeshTLSAuthentication", "{identities: []}", "spec.identities", "at least one"),
    bad("identityRef kind", "MeshTLSAuthentication", "{identityRefs: [{kind: Pod, name: a}]}", "spec.identityRefs[0].kind", "ServiceAccount or Namespace"),
    bad("server protocol", "Server", "{podSelector: {}, port: 80, proxyProtocol: HTTP/3}", "spec.proxyProtocol", "must be one of"),
    bad("server port", "Server", "{podSelector: {}, port: 0}", "spec.port", "1-65535"),
    bad("server access policy", "Server", "{podSelector: {}, port: 80, accessPolicy: allow}", "spec.accessPolicy", "unknown policy 'allow'"),
    bad("server selector", "Server", "{podSelector: {matchFields: []}, port: 80}", "spec.podSelector.matchFields", "not supported"),
    bad("server expression operator", "Server", "{podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}, port: 80}", "spec.podSelector.matchExpressions[0].operator", "must be In, NotIn"),
    bad("server expression values", "Server", "{podSelector: {matchExpressions: [{key: app, operator: In}]}, port: 80}", "spec.podSelector.matchExpressions[0].values", "must list strings"),
    bad("target kind", "AuthorizationPolicy", "{targetRef: {kind: Service, name: s}}", "spec.targetRef.kind", "Server, Namespace, HTTPRoute"),
    bad("authn kind", "AuthorizationPolicy", "{targetRef: {kind: Namespace, name: demo}, requiredAuthenticationRefs: [{kind: Secret, name: s}]}", "spec.requiredAuthenticationRefs[0].kind", "must be one of"),
    ("wrong apiVersion", "apiVersion: policy.linkerd.io/v1beta1\nkind: Server\nmetadata: {name: x, namespace: demo}\nspec: {podSelector: {}, port: 80}\n",
     "Server demo/x", "apiVersion", "policy.nodemesh.io/v1alpha1"),
    ("namespace default policy", "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, annotations: {config.nodemesh.io/default-inbound-policy: allow-all}}\n",
     "Namespace demo", "metadata.annotations.config.nodemesh.io/default-inbound-policy", "unknown default policy 'allow-all'"),
    ("pod default policy", "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo, annotations: {config.nodemesh.io/default-inbound-policy: denied}}\nspec: {nodeName: n}\n",
     "Pod demo/p", "metadata.annotations.config.nodemesh.io/default-inbound-policy", "unknown default policy 'denied'"),
])
def test_parse_errors_name_source_object_field(case, text, obj, field, words):
    assert_config_error(lambda: parse_documents(text, "p.yaml"), "p.yaml", obj, field, words)


@pytest.mark.parametrize("case, extra, obj, field, words", [
    ("policy targets a missing Server", (MESHTLS, AUTHZ), "AuthorizationPolicy demo/allow-client", "spec.targetRef.name",
     "Server demo/hello-http does not exist"),
    ("policy needs a missing authentication", (SERVER, AUTHZ), "AuthorizationPolicy demo/allow-client",
     "spec.requiredAuthenticationRefs[0].name", "MeshTLSAuthentication demo/client-only does not exist"),
    ("policy names a missing service account", (SERVER, _doc("AuthorizationPolicy",
     "{targetRef: {kind: Server, name: hello-http}, requiredAuthenticationRefs: [{kind: ServiceAccount, name: ghost}]}")),
     "AuthorizationPolicy demo/x", "spec.requiredAuthenticationRefs[0].name", "ServiceAccount demo/ghost does not exist"),
    ("identity ref to a missing service account", (_doc("MeshTLSAuthentication", "{identityRefs: [{kind: ServiceAccount, name: ghost}]}"),),
     "MeshTLSAuthentication demo/x", "spec.identityRefs[0].name", "ServiceAccount demo/ghost does not exist"),
    ("identity ref to a missing namespace", (_doc("MeshTLSAuthentication", "{identityRefs: [{kind: Namespace, name: nowhere}]}"),),
     "MeshTLSAuthentication demo/x", "spec.identityRefs[0].name", "Namespace nowhere does not exist"),
    ("policy targets another namespace", (_doc("AuthorizationPolicy", "{targetRef: {kind: Namespace, name: other}}"),),
     "AuthorizationPolicy demo/x", "spec.targetRef.name", "only target its own namespace"),
    ("policy targets a missing HTTPRoute", (_doc("AuthorizationPolicy", "{targetRef: {kind: HTTPRoute, name: r}}"),),
     "AuthorizationPolicy demo/x", "spec.targetRef.name", "HTTPRoute demo/r does not exist"),
    ("two Servers select one pod port", (SERVER, _doc("Server", "{podSelector: {matchLabels: {app: hello}}, port: 8080}", "z-other")),
     "Server demo/z-other", "spec.port", "selects port 8080 of pod demo/hello-1, which Server demo/hello-http already selects"),
])
def test_cross_object_errors_name_the_offender(case, extra, obj, field, words):
    assert_config_error(lambda: state_of(*extra), "p.yaml", obj, field, words)


def test_default_service_account_needs_no_object():
    state_of(SERVER, _doc("AuthorizationPolicy", "{targetRef: {kind: Server, name: hello-http}, requiredAuthenticationRefs: [{kind: ServiceAccount, name: default}]}"))


def test_file_source_drops_only_the_bad_policy(tmp_path):
    from nodemesh.controller.file_source import DirSource

    (tmp_path / "base.yaml").write_text(BASE + "---\n" + SERVER)
    (tmp_path / "policy.yaml").write_text(AUTHZ)  # references a MeshTLSAuthentication that is missing
    states = []
    src = DirSource(str(tmp_path), states.append)
    assert src.refresh()
    assert states[-1].get("Server", "demo", "hello-http") is not None
    assert states[-1].get("AuthorizationPolicy", "demo", "allow-client") is None
    assert any("client-only does not exist" in str(e) for e in src.errors)


@pytest.mark.parametrize("exprs, selects", [
    ("[{key: app, operator: In, values: [hello, web]}]", True),
    ("[{key: app, operator: NotIn, values: [hello]}]", False),
    ("[{key: tier, operator: DoesNotExist}]", True),
    ("[{key: tier, operator: Exists}]", False),
])
def test_match_expressions_select_pods(exprs, selects):
    st = state_of(_doc("Server", f"{{podSelector: {{matchExpressions: {exprs}}}, port: 8080}}"))
    srv = st.get("Server", "demo", "x")
    from nodemesh.policy_model import server_port
    assert (server_port(srv, st.get("Pod", "demo", "hello-1")) == 8080) is selects
    assert parse_documents(__import__("yaml").safe_dump(dump_object(srv)), "x")[0] == srv
