"""Agent authentication in Kubernetes: TokenReview through the real client against the API test
server, and the pure rule that binds a token to a node."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from nodemesh.controller.agent_auth import AgentAuthRefused, StaticTokens, TokenReviewAuthenticator, check_review
from nodemesh.controller.csr_policy import allowed_identities
from nodemesh.controller.discovery import node_config
from nodemesh.model import ClusterState, parse_object

from tests.kubeapi.client import api_client
from tests.kubeapi.objects import cluster, pod
from tests.kubeapi.server import KubeApiServer

AUD = "nodemesh-controller"
AGENT = "system:serviceaccount:nodemesh:nodemesh-agent"


@pytest.fixture
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer() as s:
        s.add_service_account_token("t-node1", "nodemesh", "nodemesh-agent", [AUD], pod="agent-a", node="node1")
        s.add_service_account_token("t-legacy", "nodemesh", "nodemesh-agent", [AUD], pod="agent-b")  # pre-1.30: pod only
        s.add_service_account_token("t-default-aud", "nodemesh", "nodemesh-agent", ["https://kubernetes.default.svc"], node="node1")
        s.add_service_account_token("t-other-sa", "demo", "client", [AUD], node="node1")
        yield s


def auth(server: KubeApiServer, state: ClusterState | None = None) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(api_client(server), AUD, "nodemesh", state=lambda: state)


def refused(fn, *args) -> AgentAuthRefused:  # type: ignore[no-untyped-def]
    with pytest.raises(AgentAuthRefused) as info:
        asyncio.run(fn(*args))
    return info.value


def test_a_node_bound_token_authenticates_its_node(server: KubeApiServer) -> None:
    a = auth(server)
    assert asyncio.run(a.authenticate("node1", "t-node1")) == "node1"
    sent = [q for m, p, q in server.requests if p.endswith("/tokenreviews")]
    assert sent and all(m == "POST" for m, p, q in server.requests if p.endswith("/tokenreviews"))


@pytest.mark.parametrize("node, token, reason, words", [
    ("node2", "t-node1", "wrong_node", "an agent on node 'node1' claimed to be node 'node2'"),
    ("node1", "t-default-aud", "wrong_audience", "audience"),
    ("node1", "t-other-sa", "not_agent", "system:serviceaccount:demo:client"),
    ("node1", "forged", "bad_token", "refused the token of node 'node1'"),
    ("node1", "", "bad_request", "must name its node"),
])
def test_refusals_say_why(server: KubeApiServer, node: str, token: str, reason: str, words: str) -> None:
    exc = refused(auth(server).authenticate, node, token)
    assert exc.reason == reason and words in str(exc), str(exc)


def test_pod_bound_tokens_resolve_the_node_through_the_agent_pod(server: KubeApiServer) -> None:
    docs = cluster()[:2] + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "nodemesh"}},
                            pod("nodemesh", "agent-b", "node2", None, {"app": "agent"})]
    state = ClusterState().apply([parse_object(d, "test") for d in docs])
    assert asyncio.run(auth(server, state).authenticate("node2", "t-legacy")) == "node2"
    assert refused(auth(server, state).authenticate, "node1", "t-legacy").reason == "wrong_node"
    assert refused(auth(server, None).authenticate, "node2", "t-legacy").reason == "wrong_node"


def test_api_failure_refuses_for_now(server: KubeApiServer) -> None:
    server.fail_next(503, path_contains="tokenreviews")
    exc = refused(auth(server).authenticate, "node1", "t-node1")
    assert exc.reason == "api_unavailable" and "503" in str(exc)
    assert asyncio.run(auth(server).authenticate("node1", "t-node1")) == "node1"


def test_check_review_rejects_a_review_for_another_audience() -> None:
    status = {"authenticated": True, "audiences": ["kubernetes"], "user": {"username": AGENT, "extra": {}}}
    with pytest.raises(AgentAuthRefused) as info:
        check_review(status, "node1", AUD, AGENT, lambda p: None)
    assert info.value.reason == "wrong_audience"


def test_static_tokens() -> None:
    st = StaticTokens({"node1": "s3cret"})
    assert asyncio.run(st.authenticate("node1", "s3cret")) == "node1"
    assert refused(st.authenticate, "node1", "nope").reason == "bad_token"
    assert refused(st.authenticate, "node9", "s3cret").reason == "unknown_node"


def test_signing_stays_node_scoped_with_kubernetes_state() -> None:
    """The lab's rule, on a state built from API-shaped objects: node1 may hold only the identities
    of pods scheduled on node1."""
    docs = [d for d in cluster() if d["metadata"]["name"] not in ("kube-proxy-x", "pending", "job-done")]
    state = ClusterState().apply([parse_object(d, "kubernetes") for d in docs])
    ids = allowed_identities(node_config(state, "node1", 1), "node1")
    assert "spiffe://cluster.local/ns/demo/sa/client" in ids
    node2 = allowed_identities(node_config(state, "node2", 1), "node2")
    assert "spiffe://cluster.local/ns/demo/sa/client" not in node2
