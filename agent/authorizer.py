"""Authorization at the node proxy: the policy in force, its counters, and live re-evaluation.

Both enforcement points (inbound.py for connections from other nodes, outbound.py's local plan for
same-node connections) call `Authorizer.check` before dialing the pod, so a refused client never
gets a byte to it. An authorized connection object records `authz_subject`; when a new policy
arrives, `Authorizer.apply` walks the proxy's live connections and resets those the new policy no
longer allows (Linkerd's inbound_tcp_authz_terminate_total; ztunnel does not, istio/ztunnel#311).

A malformed policy section keeps the last good policy in force (never fail open) and is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodemesh.agent.relay import reset_transport
from nodemesh.authz import ClientInfo, Decision, NodePolicy, authorize, plaintext_decision
from nodemesh.authz_routes import authorize_any_route
from nodemesh.nodeconfig import NodeConfig

log = logging.getLogger(__name__)

# Linkerd's inbound authorization labels (target_addr is bounded by local pods x ports).
AUTHZ_LABELS = ("direction", "srv_kind", "srv_name", "srv_port", "authz_kind", "authz_name", "target_addr", "tls", "client_id")
HTTP_LABELS = AUTHZ_LABELS + ("route_name",)


@dataclass(frozen=True)
class Subject:
    """What an authorized connection was authorized as, kept on the connection for re-checks."""

    client: ClientInfo
    namespace: str
    pod: str
    pod_ip: str
    port: int
    route: str | None = None  # an in-flight L7 request's HTTPRoute: re-checks count route policies too
    plaintext: bool = False  # came in plaintext from off the mesh (captured / 4143): strict mode re-checks it
    any_route: bool = False  # an HTTP-served port's connection: open while some route policy could allow it (authz_routes)


class Authorizer:
    def __init__(self, policy: NodePolicy | None = None) -> None:
        self.policy = policy if policy is not None else NodePolicy()
        self.policy_version = 0  # NodeConfig version the policy in force came from (0 = none yet)
        self.rejected_total = 0  # policy sections refused as malformed
        self._tcp: Counter[tuple[str, tuple[str, ...]]] = Counter()  # (allow|deny|terminate, labels)
        self._http: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self._plaintext: Counter[tuple[str, str, str]] = Counter()  # (dst_namespace, via, outcome)

    # ---- decisions -------------------------------------------------------------------------

    def check(self, subject: Subject) -> Decision:
        """Connection-level decision, counted and (when denied) logged as one actionable line."""
        d = _decide(self.policy, subject)
        self._tcp[("allow" if d.allowed else "deny", _labels(d, subject))] += 1
        if not d.allowed:
            log.warning("authz deny: %s -> %s/%s:%d: %s", _who(subject.client), subject.namespace, subject.pod, subject.port, d.reason)
        return d

    def check_plaintext(self, subject: Subject, via: str) -> Decision:
        """Strict/permissive inbound mode for a plaintext connection (via = captured | inbound_port),
        before `check`: strict refuses it whatever the policy. Counted; the caller logs its refusal."""
        d = plaintext_decision(self.policy, subject.namespace, subject.pod, subject.port)
        self._plaintext[(subject.namespace, via, "allowed" if d.allowed else "refused_strict")] += 1
        return d

    def plaintext_count(self, outcome: str, via: str | None = None) -> int:
        return sum(n for (_, v, o), n in self._plaintext.items() if o == outcome and via in (None, v))

    def check_http(self, subject: Subject, route: str | None) -> Decision:
        """Per-request decision for the L7 proxy (route = the matched HTTPRoute's name, None when no
        route matched: only Server/Namespace policies count): it answers 403 on deny and keeps the
        connection for the next request."""
        d = authorize(self.policy, subject.client, subject.namespace, subject.pod, subject.port, http_route=route)
        self._http[("allow" if d.allowed else "deny", _labels(d, subject) + (route or "default",))] += 1
        if not d.allowed:
            log.warning("authz deny: %s -> %s/%s:%d route %s: %s", _who(subject.client), subject.namespace, subject.pod, subject.port, route or "default", d.reason)
        return d

    # ---- policy updates --------------------------------------------------------------------

    def apply(self, cfg: NodeConfig, connections: Iterable[asyncio.BaseTransport]) -> int:
        """Adopt cfg's policy and cut live connections it no longer allows; returns how many were cut.
        A malformed section is refused: the previous policy stays in force."""
        try:
            policy = NodePolicy.from_extra(cfg.extra)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.rejected_total += 1
            log.error("config %s: malformed authorization policy (%s: %s); still enforcing the policy of config %s",
                      cfg.version, type(exc).__name__, exc, self.policy_version)
            return 0
        changed = policy != self.policy
        self.policy, self.policy_version = policy, cfg.version
        return self.revalidate(connections) if changed else 0

    def revalidate(self, connections: Iterable[asyncio.BaseTransport]) -> int:
        cut = 0
        for transport in list(connections):
            origin, transports = _owner(transport)
            subject = getattr(origin, "authz_subject", None)
            if subject is None:
                continue
            d = _decide(self.policy, subject)
            if d.allowed and subject.plaintext:
                d = plaintext_decision(self.policy, subject.namespace, subject.pod, subject.port)
            if d.allowed:
                continue
            cut += 1
            self._tcp[("terminate", _labels(d, subject))] += 1
            log.warning("authz terminate: %s -> %s/%s:%d no longer allowed: %s", _who(subject.client), subject.namespace, subject.pod, subject.port, d.reason)
            origin.authz_subject = None
            for t in transports:
                if not t.is_closing():
                    reset_transport(t)
        return cut

    # ---- metrics ---------------------------------------------------------------------------

    def count(self, verdict: str, **match: str) -> int:
        """Sum of TCP counters with `verdict` whose labels include `match` (tests, CLI)."""
        return sum(n for (v, labels), n in self._tcp.items() if v == verdict and all(dict(zip(AUTHZ_LABELS, labels)).get(k) == val for k, val in match.items()))

    def collect(self) -> Iterator[Metric]:
        names = {
            "allow": ("inbound_tcp_authz_allow_total", "Connections authorized"),
            "deny": ("inbound_tcp_authz_deny_total", "Connections refused by authorization policy"),
            "terminate": ("inbound_tcp_authz_terminate_total", "Live connections closed because the policy no longer allows them"),
        }
        for verdict, (name, doc) in names.items():
            fam = CounterMetricFamily(name, doc, labels=AUTHZ_LABELS)
            for (v, labels), n in sorted(self._tcp.items()):
                if v == verdict:
                    fam.add_metric(labels, n)
            yield fam
        for verdict in ("allow", "deny"):
            fam = CounterMetricFamily(f"inbound_http_authz_{verdict}_total", f"HTTP requests {verdict}ed by route authorization", labels=HTTP_LABELS)
            for (v, labels), n in sorted(self._http.items()):
                if v == verdict:
                    fam.add_metric(labels, n)
            yield fam
        fam = CounterMetricFamily("nodemesh_inbound_plaintext_total",
                                  "Plaintext inbound connections (captured non-meshed clients, plaintext 4143 tunnel) by inbound mode outcome",
                                  labels=("dst_namespace", "via", "outcome"))
        for key, n in sorted(self._plaintext.items()):
            fam.add_metric(key, n)
        yield fam
        yield GaugeMetricFamily("nodemesh_policy_config_version", "Config version whose authorization policy is in force", value=self.policy_version)
        yield CounterMetricFamily("nodemesh_policy_rejected_total", "Malformed policy sections refused (last good policy kept)", value=self.rejected_total)


def _decide(policy: NodePolicy, s: Subject) -> Decision:
    if s.any_route and s.route is None:
        return authorize_any_route(policy, s.client, s.namespace, s.pod, s.port)
    return authorize(policy, s.client, s.namespace, s.pod, s.port, http_route=s.route)


def _labels(d: Decision, s: Subject) -> tuple[str, ...]:
    return ("inbound", d.server_kind, d.server_name, str(s.port), d.authz_kind, d.authz_name,
            f"{s.pod_ip}:{s.port}", "true" if s.client.tls else "false", s.client.identity or "")


def _who(c: ClientInfo) -> str:
    return f"{c.identity} ({c.ip})" if c.identity else f"unauthenticated {c.ip}"


def _owner(transport: asyncio.BaseTransport) -> tuple[object, tuple[asyncio.BaseTransport, ...]]:
    """The connection object behind an accepted transport and every transport to cut with it: the
    relay's two sides once relaying, else the accepted transport alone (still dialing)."""
    proto = transport.get_protocol()
    relay = getattr(proto, "relay", None)
    if relay is not None:
        return relay.origin, tuple(t for t in (relay.a.transport, relay.b.transport) if t is not None)
    return proto, (transport,)
