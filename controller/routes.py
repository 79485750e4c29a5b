"""The L7 sections of a NodeConfig, as pure functions of the cluster state: HTTPRoutes in the wire
form agent/routes.py compiles (extra["http_routes"]) and the service ports marked opaque by the
`config.linkerd.io/opaque-ports` annotation (extra["opaque_ports"], VIP:port pairs)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodemesh.model import ClusterState
from nodemesh.nodeconfig import NodeConfig
from nodemesh.route_model import OPAQUE_PORTS_ANNOTATION, parse_opaque_ports

HTTP_ROUTES_KEY = "http_routes"  # = agent.routes.EXTRA_KEY
OPAQUE_PORTS_KEY = "opaque_ports"  # = agent.detect.OPAQUE_PORTS_EXTRA


def http_routes(state: ClusterState) -> list[dict[str, Any]]:
    out = []
    for route in state.of_kind("HTTPRoute"):
        for parent in route.parents:
            out.append({"route": f"{route.namespace}/{route.name}", "parent": list(parent), "rules": [dict(r) for r in route.rules]})
    return out


def opaque_ports(state: ClusterState) -> list[list[Any]]:
    """[cluster_ip, port] of each service port listed in the annotation (ports or ranges; a value
    that does not parse was refused by route_model.validate, so it is skipped here)."""
    out = []
    for svc in state.services:
        value = svc.annotations.get(OPAQUE_PORTS_ANNOTATION)
        if not value or not svc.cluster_ip:
            continue
        try:
            ports = parse_opaque_ports(value)
        except ValueError:
            continue
        out.extend([svc.cluster_ip, p.port] for p in svc.ports if p.port in ports)
    return out


def with_routes(cfg: NodeConfig, state: ClusterState) -> NodeConfig:
    extra = dict(cfg.extra)
    routes, opaque = http_routes(state), opaque_ports(state)
    if routes:
        extra[HTTP_ROUTES_KEY] = routes
    if opaque:
        extra[OPAQUE_PORTS_KEY] = opaque
    return replace(cfg, extra=extra) if extra != cfg.extra else cfg
