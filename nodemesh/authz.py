"""Effective authorization policy on the wire, and the one pure decision every enforcement point uses.

The controller resolves the policy objects (Servers, AuthorizationPolicies, authentications,
default-policy annotations) into a `NodePolicy` per node: for each local pod, its default policy
and its Servers with the authorizations already flattened into identity and network sets. It rides
in `NodeConfig.extra["policy"]` (`to_dict`/`from_dict`).

`authorize(policy, client, pod, port, http_route)` is the decision: no sockets, no clock. The
inbound (cross-node) and the outbound's local plan (same node) call it with the client they know;
when verified mTLS identities land, only where `ClientInfo.identity` comes from changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from nodemesh.policy_model import DEFAULT_POLICIES, INBOUND_MODES

DEFAULT_ALLOW = "all-unauthenticated"
POLICY_KEY = "policy"  # NodeConfig.extra key


@dataclass(frozen=True)
class NetworkRule:
    cidr: str
    except_: tuple[str, ...] = ()

    def contains(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if addr not in ipaddress.ip_network(self.cidr):
            return False
        return not any(addr in ipaddress.ip_network(e) for e in self.except_)


@dataclass(frozen=True)
class Authorization:
    """One AuthorizationPolicy, resolved: every identity set and every network set must match
    (Linkerd: all requiredAuthenticationRefs hold); no sets at all = every client."""

    name: str
    target_kind: str  # Server | Namespace | HTTPRoute
    identity_sets: tuple[tuple[str, ...], ...] = ()
    network_sets: tuple[tuple[NetworkRule, ...], ...] = ()


@dataclass(frozen=True)
class RoutePolicy:
    route: str  # HTTPRoute name (namespace = the pod's)
    authorizations: tuple[Authorization, ...] = ()


@dataclass(frozen=True)
class ServerPolicy:
    name: str
    port: int
    protocol: str = "unknown"
    authorizations: tuple[Authorization, ...] = ()  # Server- and Namespace-targeted
    routes: tuple[RoutePolicy, ...] = ()  # HTTPRoute-targeted: checked per request by the L7 proxy
    access_policy: str = "deny"  # decides clients no authorization matches (Server.spec.accessPolicy)


@dataclass(frozen=True)
class PodPolicy:
    namespace: str
    name: str
    ip: str
    default: str = DEFAULT_ALLOW  # for ports no Server selects
    default_source: str = "cluster default"  # where the default came from, for explanations
    servers: tuple[ServerPolicy, ...] = ()
    inbound_mode: str = "permissive"  # strict: plaintext inbound refused (see plaintext_decision)
    inbound_mode_source: str = "cluster default"

    def server(self, port: int) -> ServerPolicy | None:
        return next((s for s in self.servers if s.port == port), None)


@dataclass(frozen=True)
class NodePolicy:
    pods: tuple[PodPolicy, ...] = ()
    cluster_networks: tuple[str, ...] = ()  # for the cluster-* defaults
    unknown_pod: str = DEFAULT_ALLOW  # a pod the policy does not list (controller sets "deny")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodePolicy:
        """Strict: a malformed section raises (KeyError/TypeError/ValueError) so the agent keeps
        its last good policy instead of enforcing a half-read one."""

        def authz(a: Mapping[str, Any]) -> Authorization:
            return Authorization(
                name=str(a["name"]),
                target_kind=str(a["target_kind"]),
                identity_sets=tuple(tuple(str(i) for i in s) for s in a.get("identity_sets", ())),
                network_sets=tuple(tuple(_network(n) for n in s) for s in a.get("network_sets", ())),
            )

        pods = []
        for p in d.get("pods", ()):
            servers = tuple(
                ServerPolicy(
                    name=str(s["name"]), port=_port(s["port"]), protocol=str(s.get("protocol", "unknown")),
                    authorizations=tuple(authz(a) for a in s.get("authorizations", ())),
                    routes=tuple(RoutePolicy(str(r["route"]), tuple(authz(a) for a in r.get("authorizations", ()))) for r in s.get("routes", ())),
                    access_policy=_default(s.get("access_policy", "deny")),
                )
                for s in p.get("servers", ())
            )
            pods.append(PodPolicy(
                namespace=str(p["namespace"]), name=str(p["name"]), ip=str(ipaddress.ip_address(p["ip"])),
                default=_default(p.get("default", DEFAULT_ALLOW)), default_source=str(p.get("default_source", "")),
                servers=servers,
                inbound_mode=_mode(p.get("inbound_mode", "permissive")),
                inbound_mode_source=str(p.get("inbound_mode_source", "")),
            ))
        return cls(
            pods=tuple(pods),
            cluster_networks=tuple(str(ipaddress.ip_network(c)) for c in d.get("cluster_networks", ())),
            unknown_pod=_default(d.get("unknown_pod", DEFAULT_ALLOW)),
        )

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> NodePolicy:
        """The policy section of a NodeConfig; an absent section (a controller without policy
        support) means every connection is allowed, as before policy existed."""
        section = extra.get(POLICY_KEY)
        return cls() if section is None else cls.from_dict(section)

    def pod(self, namespace: str, name: str) -> PodPolicy | None:
        return next((p for p in self.pods if p.namespace == namespace and p.name == name), None)


def _network(n: Mapping[str, Any]) -> NetworkRule:
    return NetworkRule(str(ipaddress.ip_network(n["cidr"])), tuple(str(ipaddress.ip_network(e)) for e in n.get("except_", ())))


def _port(value: Any) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"port {value!r} is not in 1..65535")
    return value


def _mode(value: Any) -> str:
    if value not in INBOUND_MODES:
        raise ValueError(f"unknown inbound mode {value!r}")
    return str(value)


def _default(value: Any) -> str:
    if value not in DEFAULT_POLICIES:
        raise ValueError(f"unknown default policy {value!r}")
    return str(value)


# ---- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientInfo:
    identity: str | None  # SPIFFE ID; None = unauthenticated (not a meshed workload)
    ip: str
    tls: bool = False  # arrived over mTLS (metrics label); same-node traffic is authenticated without it


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # one sentence a person can act on
    server_kind: str = "default"  # "default" (a default policy decided) or "Server"
    server_name: str = ""  # the Server, or the default policy's name
    authz_kind: str = ""  # "default" | "AuthorizationPolicy" | "" (denied by no matching policy)
    authz_name: str = ""
    route: str | None = None
    checked: tuple[str, ...] = field(default=(), compare=False)  # why each candidate did not match

    @property
    def policy_name(self) -> str:
        return self.authz_name or self.server_name


def _identity_matches(pattern: str, identity: str | None) -> bool:
    if identity is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return identity.startswith(pattern[:-1])
    return identity == pattern


def _in_networks(ip: str, rules: Iterable[NetworkRule]) -> bool:
    try:
        return any(r.contains(ip) for r in rules)
    except ValueError:
        return False  # not an IP (a unix socket peer...): matches no network


def _check(a: Authorization, client: ClientInfo) -> str | None:
    """None if `a` authorizes the client, else why not."""
    for ids in a.identity_sets:
        if not any(_identity_matches(p, client.identity) for p in ids):
            who = client.identity or "an unauthenticated client"
            return f"{a.name}: {who} is not one of {', '.join(ids)}"
    for nets in a.network_sets:
        if not _in_networks(client.ip, nets):
            return f"{a.name}: {client.ip} is not in {', '.join(n.cidr for n in nets)}"
    return None


def _default_decision(default: str, source: str, client: ClientInfo, cluster_networks: tuple[str, ...], what: str) -> Decision:
    need_id = default in ("all-authenticated", "cluster-authenticated")
    need_cluster = default in ("cluster-unauthenticated", "cluster-authenticated")
    if default == "deny":
        ok, why = False, "allows no client"
    elif need_id and client.identity is None:
        ok, why = False, "requires a meshed (authenticated) client"
    elif need_cluster and not _in_networks(client.ip, (NetworkRule(c) for c in cluster_networks)):
        ok, why = False, f"requires a client inside the cluster networks ({', '.join(cluster_networks) or 'none known'})"
    else:
        ok, why = True, "allows it"
    verdict = "allowed" if ok else "denied"
    return Decision(ok, f"{verdict} by default policy {default} ({source}) for {what}: {why}", "default", default, "default" if ok else "", default if ok else "")


def authorize(
    policy: NodePolicy,
    client: ClientInfo,
    namespace: str,
    pod: str,
    port: int,
    http_route: str | None = None,
) -> Decision:
    """May `client` reach `port` of pod namespace/pod? http_route=None is the connection-level
    check (route-targeted policies do not open a connection); the L7 proxy calls again per request
    with the matched HTTPRoute's name, and route-targeted policies then count too."""
    what = f"{namespace}/{pod}:{port}"
    pp = policy.pod(namespace, pod)
    if pp is None:
        return _default_decision(policy.unknown_pod, "pod not in the node's policy", client, policy.cluster_networks, what)
    server = pp.server(port)
    if server is None:
        return _default_decision(pp.default, pp.default_source, client, policy.cluster_networks, what)
    candidates = list(server.authorizations)
    if http_route is not None:
        candidates += [a for r in server.routes if r.route == http_route for a in r.authorizations]
    checked = []
    for a in candidates:
        why = _check(a, client)
        if why is None:
            return Decision(True, f"allowed by AuthorizationPolicy {a.name} on Server {server.name} for {what}",
                            "Server", server.name, "AuthorizationPolicy", a.name, http_route)
        checked.append(why)
    if server.access_policy != "deny":
        d = _default_decision(server.access_policy, f"accessPolicy of Server {server.name}", client, policy.cluster_networks, what)
        if d.allowed:
            return Decision(True, d.reason, "Server", server.name, "default", server.access_policy, http_route)
    who = client.identity or f"unauthenticated {client.ip}"
    if not candidates:
        reason = f"denied: Server {server.name} selects {what} and no AuthorizationPolicy authorizes {who}" + (
            f" (route {http_route})" if http_route else "")
    else:
        reason = f"denied: no AuthorizationPolicy on Server {server.name} authorizes {who} for {what} ({'; '.join(checked)})"
    return Decision(False, reason, "Server", server.name, "", "", http_route, tuple(checked))


def plaintext_decision(policy: NodePolicy, namespace: str, pod: str, port: int) -> Decision:
    """May a *plaintext* inbound connection (a captured non-meshed client, or the plaintext 4143
    tunnel from another node) reach namespace/pod at all? Checked before `authorize`: `strict`
    refuses it whatever the authorization policy says (even all-unauthenticated); `permissive`
    passes it on to `authorize`, which sees an unauthenticated client (captured) and decides.
    A pod the policy does not list is refused by `authorize` anyway (unknown_pod = deny)."""
    what = f"{namespace}/{pod}:{port}"
    pp = policy.pod(namespace, pod)
    if pp is None or pp.inbound_mode != "strict":
        mode = pp.inbound_mode if pp is not None else "permissive"
        return Decision(True, f"plaintext allowed: inbound mode {mode} for {what}", "default", mode)
    return Decision(False, f"plaintext refused: {what} is in strict inbound mode ({pp.inbound_mode_source}); "
                           "only mTLS from meshed workloads may reach it", "default", "strict")
