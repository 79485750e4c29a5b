"""The effective authorization policy of every local pod port, per node: a pure function of the state.

Precedence of the default policy (for ports no Server selects), as in Linkerd: the pod's
`config.nodemesh.io/default-inbound-policy` annotation, then its namespace's, then the cluster
default (a controller flag). A port a Server selects is governed only by the AuthorizationPolicies
targeting that Server or the whole namespace (a Server nobody authorizes denies everyone).
"""

from __future__ import annotations

from dataclasses import replace

from nodemesh.authz import POLICY_KEY, Authorization, NetworkRule, NodePolicy, PodPolicy, RoutePolicy, ServerPolicy
from nodemesh.model import ClusterState, Pod, spiffe_id
from nodemesh.nodeconfig import NodeConfig
from nodemesh.policy_model import DEFAULT_POLICY_ANNOTATION, INBOUND_MODE_ANNOTATION, AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication, server_port

from nodemesh.controller.discovery import _meshed_pods_with_ip


def _annotation(state: ClusterState, pod: Pod, key: str, fallback: tuple[str, str]) -> tuple[str, str]:
    """(value, where it came from): `key` on the pod, then on its namespace, else `fallback`."""
    value = pod.annotations.get(key)
    if value:
        return value, f"annotation on pod {pod.namespace}/{pod.name}"
    ns = state.get("Namespace", "", pod.namespace)
    value = ns.annotations.get(key) if ns is not None else None
    if value:
        return value, f"annotation on namespace {pod.namespace}"
    return fallback


def default_policy(state: ClusterState, pod: Pod, cluster_default: str) -> tuple[str, str]:
    """(policy name, where it came from) for `pod`."""
    return _annotation(state, pod, DEFAULT_POLICY_ANNOTATION, (cluster_default, "cluster default"))


def inbound_mode(state: ClusterState, pod: Pod) -> tuple[str, str]:
    """(strict|permissive, where it came from): the pod's `config.nodemesh.io/inbound-mode`
    annotation, then its namespace's, then permissive (Linkerd's default)."""
    return _annotation(state, pod, INBOUND_MODE_ANNOTATION, ("permissive", "default"))


def _identities(state: ClusterState, authn: MeshTLSAuthentication) -> tuple[str, ...]:
    ids = list(authn.identities)
    for ref in authn.identity_refs:
        if ref.kind == "Namespace":
            ids.append(spiffe_id(ref.name, "*", state.trust_domain))
        else:
            ids.append(spiffe_id(ref.namespace, ref.name, state.trust_domain))
    return tuple(ids)


def resolve(state: ClusterState, pol: AuthorizationPolicy) -> Authorization | None:
    """Flattens a policy's authentications; None if one of them is missing (then it authorizes
    nobody: validation normally rejects such a policy first, this is the fail-closed backstop)."""
    id_sets: list[tuple[str, ...]] = []
    net_sets: list[tuple[NetworkRule, ...]] = []
    for ref in pol.required:
        if ref.kind == "ServiceAccount":
            id_sets.append((spiffe_id(ref.namespace, ref.name, state.trust_domain),))
            continue
        obj = state.get(ref.kind, ref.namespace, ref.name)
        if isinstance(obj, MeshTLSAuthentication):
            id_sets.append(_identities(state, obj))
        elif isinstance(obj, NetworkAuthentication):
            net_sets.append(tuple(NetworkRule(n.cidr, n.except_) for n in obj.networks))
        else:
            return None
    return Authorization(pol.name, pol.target.kind, tuple(id_sets), tuple(net_sets))


def pod_policy(state: ClusterState, pod: Pod, cluster_default: str) -> PodPolicy:
    default, source = default_policy(state, pod, cluster_default)
    policies = [p for p in state.of_kind("AuthorizationPolicy") if p.namespace == pod.namespace]
    resolved = {p.name: resolve(state, p) for p in policies}
    route_policies: dict[str, list[Authorization]] = {}
    for p in policies:
        if p.target.kind == "HTTPRoute" and resolved[p.name] is not None:
            route_policies.setdefault(p.target.name, []).append(resolved[p.name])  # type: ignore[arg-type]
    servers = []
    for server in state.of_kind("Server"):
        port = server_port(server, pod)
        if port is None:
            continue
        authz = tuple(
            a for p in policies
            if (a := resolved[p.name]) is not None
            and (p.target.kind == "Namespace" or (p.target.kind == "Server" and p.target.name == server.name))
        )
        # Route policies are listed on every Server of the namespace until HTTPRoute parentRefs
        # (the L7 issue) say which Server a route attaches to; they only count per request.
        routes = tuple(RoutePolicy(name, tuple(a)) for name, a in sorted(route_policies.items()))
        servers.append(ServerPolicy(server.name, port, server.proxy_protocol, authz, routes, server.access_policy))
    assert pod.pod_ip is not None
    mode, mode_source = inbound_mode(state, pod)
    return PodPolicy(pod.namespace, pod.name, pod.pod_ip, default, source, tuple(sorted(servers, key=lambda s: s.port)), mode, mode_source)


def cluster_networks(state: ClusterState) -> tuple[str, ...]:
    nets = [n.pod_cidr for n in state.nodes if n.pod_cidr]
    nets += [f"{n.internal_ip}/32" for n in state.nodes if n.internal_ip]
    return tuple(nets)


def node_policy(state: ClusterState, node: str, cluster_default: str = "all-unauthenticated") -> NodePolicy:
    """The policy for every meshed pod on `node` (with an IP). Pods the agent does not find here
    get `deny`: the agent never guesses an allow."""
    pods = tuple(pod_policy(state, p, cluster_default) for p in _meshed_pods_with_ip(state) if p.node_name == node)
    return NodePolicy(pods, cluster_networks(state), unknown_pod="deny")


def with_policy(cfg: NodeConfig, state: ClusterState, cluster_default: str = "all-unauthenticated") -> NodeConfig:
    """`cfg` with its node's policy in extra["policy"]."""
    return replace(cfg, extra={**cfg.extra, POLICY_KEY: node_policy(state, cfg.node, cluster_default).to_dict()})
