"""The routing decision for one outbound connection, as a pure function (ztunnel's `build_request`).

decide(view, source_ip, original_dst, balancer) -> Plan. No sockets, no clock, no logging: the only
state it touches is the injected balancer's rotation, so it is tested table-style. I/O happens after
it, in outbound.py, driven by the Plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nodemesh.agent.balance import Balancer
from nodemesh.agent.handshake import TunnelRequest
from nodemesh.agent.workloads import NodeView
from nodemesh.nodeconfig import Endpoint, WorkloadPod

PlanKind = Literal["local", "remote", "reject"]


@dataclass(frozen=True)
class DstLabels:
    """Who the connection is for, in Linkerd's dst_* terms. Metrics keep only the bounded ones
    (namespace, service); pod and authority are for logs and, later, tap."""

    dst_namespace: str = ""
    dst_service: str = ""
    dst_pod: str = ""
    authority: str = ""


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    labels: DstLabels = DstLabels()
    target: Endpoint | None = None  # the pod the bytes end up at
    connect: tuple[str, int] | None = None  # what the proxy dials: the pod (local) or a node's inbound port
    src_identity: str | None = None  # SPIFFE ID of the local pod at source_ip; None if unmeshed
    tunnel: TunnelRequest | None = None  # remote only: the handshake to send after connecting
    reason: str = ""  # reject only: one human sentence


def decide(view: NodeView, source_ip: str, orig_dst: tuple[str, int], balancer: Balancer) -> Plan:
    src = view.local_pod(source_ip)
    src_identity = src.identity if src is not None else None
    ip, port = orig_dst

    target = view.service_port(ip, port)
    if target is not None:
        svc = target.service
        labels = DstLabels(svc.namespace, svc.name, "", f"{svc.authority}:{port}")
        # An endpoint on a node this config does not describe cannot be reached; leave it out rather
        # than fail every Nth connection (a malformed entry only rejects itself).
        usable = [e for e in target.port.endpoints if e.node == view.node or view.node_info(e.node) is not None]
        if not usable:
            why = "no endpoints" if not target.port.endpoints else "no endpoints on known nodes"
            return Plan("reject", labels, src_identity=src_identity, reason=f"{why} for service {svc.namespace}/{svc.name} port {port}")
        ep = balancer.pick(target.key, usable)
        return _to_endpoint(view, ep, labels, src_identity)

    pod = view.pod(ip)
    if pod is not None:
        labels = DstLabels(pod.namespace, "", pod.name, f"{ip}:{port}")
        return _to_endpoint(view, _pod_endpoint(pod, port), labels, src_identity)

    if view.is_service_ip(ip):
        return Plan("reject", DstLabels(authority=f"{ip}:{port}"), src_identity=src_identity, reason=f"service {ip} has no port {port}")
    return Plan(
        "reject",
        DstLabels(authority=f"{ip}:{port}"),
        src_identity=src_identity,
        reason=f"{ip}:{port} is not a meshed destination in config version {view.version}",
    )


def _pod_endpoint(pod: WorkloadPod, port: int) -> Endpoint:
    return Endpoint(pod.namespace, pod.name, pod.ip, port, pod.node, pod.identity)


def _to_endpoint(view: NodeView, ep: Endpoint, labels: DstLabels, src_identity: str | None) -> Plan:
    labels = DstLabels(labels.dst_namespace, labels.dst_service, ep.pod, labels.authority)
    if ep.node == view.node:
        return Plan("local", labels, ep, (ep.ip, ep.port), src_identity)
    node = view.node_info(ep.node)
    if node is None:
        return Plan("reject", labels, ep, src_identity=src_identity, reason=f"pod {ep.namespace}/{ep.pod} is on node {ep.node!r}, which the config does not describe")
    tunnel = TunnelRequest(ep.ip, ep.port, src_identity, f"{ep.namespace}/{ep.pod}")
    return Plan("remote", labels, ep, (node.internal_ip, node.inbound_port), src_identity, tunnel)


def plan_for_endpoint(view: NodeView, ep: Endpoint, labels: DstLabels, src_identity: str | None) -> Plan:
    """The plan for one chosen endpoint (L7 picks per request, then dials with this plan)."""
    return _to_endpoint(view, ep, labels, src_identity)
