"""The agent's Authorizer without sockets: counters, the HTTP hook for the L7 proxy, policy swaps."""

from __future__ import annotations

from nodemesh.agent.authorizer import Authorizer, Subject
from nodemesh.authz import ClientInfo
from nodemesh.controller.policy import node_policy
from nodemesh.nodeconfig import NodeConfig
from nodemesh.scrape import total

from .test_authz import CLIENT, DEFAULT, ROUTE_ONLY, cluster


def subject(identity: str | None) -> Subject:
    return Subject(ClientInfo(identity, "10.244.1.7", tls=True), "demo", "hello-1", "10.244.1.2", 8080)


def test_http_hook_counts_per_route_with_linkerd_names():
    a = Authorizer(node_policy(cluster(policies=ROUTE_ONLY, validate=False), "node1"))
    assert a.check_http(subject(DEFAULT), "health").allowed
    assert not a.check_http(subject(DEFAULT), "api").allowed
    text = __import__("prometheus_client").generate_latest(_registry(a)).decode()
    assert total(text, "inbound_http_authz_allow_total", {"route_name": "health", "authz_name": "other-on-health", "tls": "true"}) == 1
    assert total(text, "inbound_http_authz_deny_total", {"route_name": "api", "srv_name": "hello-http", "client_id": DEFAULT}) == 1


def test_apply_swaps_policy_and_rejects_malformed():
    a = Authorizer()
    st = cluster(ns_default="deny")
    assert a.check(subject(CLIENT)).allowed  # no policy yet: everything allowed, as before policy existed
    a.apply(NodeConfig(version=5, node="node1", extra={"policy": node_policy(st, "node1").to_dict()}), [])
    assert a.policy_version == 5 and not a.check(subject(CLIENT)).allowed
    a.apply(NodeConfig(version=6, node="node1", extra={"policy": {"pods": "garbage"}}), [])
    assert a.policy_version == 5 and a.rejected_total == 1 and not a.check(subject(CLIENT)).allowed


def _registry(a: Authorizer):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(a)
    return reg
