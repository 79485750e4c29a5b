"""EndpointSlice (discovery.k8s.io/v1): the endpoints Kubernetes computed for a Service.

In a cluster the EndpointSlice controller decides which pods back a Service port (selector, pod
readiness, named targetPorts resolved per pod); kube-proxy programs exactly that, and so does
nodemesh: a Service that has slices takes its endpoints from them (controller/discovery.py). The
standalone lab has no such controller and derives endpoints from selectors, by the same rules for
the ready pods it runs; a test proves both give agents the same config.

Registered into nodemesh.model through a hook (KINDS, parse, dump, validate) like policy_model.
Parsing is lenient where the API is (null ports, addresses of other families are skipped by
discovery) and strict where a wrong value would misroute (addresses, port numbers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodemesh.model import ClusterState, _Reader

API_VERSION = "discovery.k8s.io/v1"
KINDS = ("EndpointSlice",)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


@dataclass(frozen=True)
class SlicePort:
    name: str  # "" for a Service's single unnamed port
    port: int | None  # None: "all ports" (the API allows it; nodemesh routes nothing by it)
    protocol: str = "TCP"


@dataclass(frozen=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool  # conditions.ready; unset counts as ready, as the API says consumers should
    node_name: str = ""
    pod: str = ""  # targetRef name when targetRef.kind is Pod ("" for non-pod endpoints)
    pod_namespace: str = ""


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str  # the kubernetes.io/service-name label ("" = belongs to no Service)
    address_type: str
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()
    labels: Mapping[str, str] | None = None

    kind = "EndpointSlice"


KIND_TYPES = (EndpointSlice,)


def parse(r: _Reader, kind: str, namespace: str) -> EndpointSlice:
    api = r.get("apiVersion", str)
    if api != API_VERSION:
        raise r.fail("apiVersion", f"must be {API_VERSION!r} for {kind}, got {api!r}")
    name = r.get("metadata.name", str)
    labels = r.str_map("metadata.labels")
    address_type = r.get("addressType", str)
    if address_type not in ADDRESS_TYPES:
        raise r.fail("addressType", f"must be one of {', '.join(ADDRESS_TYPES)}, got {address_type!r}")
    ports = []
    for i, p in enumerate(r.get("ports", list, [])):
        path = f"ports[{i}]"
        if not isinstance(p, Mapping):
            raise r.fail(path, "must be a mapping with name, port and protocol")
        number = p.get("port")
        ports.append(SlicePort(
            name=str(p.get("name") or ""),
            port=None if number is None else r.port(f"{path}.port", number),
            protocol=str(p.get("protocol") or "TCP"),
        ))
    endpoints = []
    for i, e in enumerate(r.get("endpoints", list, [])):
        path = f"endpoints[{i}]"
        if not isinstance(e, Mapping):
            raise r.fail(path, "must be a mapping with addresses")
        addresses = e.get("addresses")
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise r.fail(f"{path}.addresses", "must list at least one address")
        if address_type != "FQDN":
            for j, a in enumerate(addresses):
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise r.fail(f"{path}.addresses[{j}]", f"{a!r} is not an {address_type} address") from None
        conditions = e.get("conditions") or {}
        ready = conditions.get("ready") if isinstance(conditions, Mapping) else None
        target = e.get("targetRef") or {}
        is_pod = isinstance(target, Mapping) and target.get("kind") == "Pod"
        endpoints.append(SliceEndpoint(
            addresses=tuple(addresses), ready=ready is not False,
            node_name=str(e.get("nodeName") or ""),
            pod=str(target.get("name") or "") if is_pod else "",
            pod_namespace=str(target.get("namespace") or namespace) if is_pod else "",
        ))
    return EndpointSlice(namespace, name, labels.get(SERVICE_NAME_LABEL, ""), address_type,
                         tuple(ports), tuple(endpoints), labels)


def dump(obj: EndpointSlice) -> dict[str, Any]:
    endpoints = []
    for e in obj.endpoints:
        d: dict[str, Any] = {"addresses": list(e.addresses), "conditions": {"ready": e.ready}}
        if e.node_name:
            d["nodeName"] = e.node_name
        if e.pod:
            d["targetRef"] = {"kind": "Pod", "name": e.pod, "namespace": e.pod_namespace}
        endpoints.append(d)
    return {
        "apiVersion": API_VERSION, "kind": obj.kind, "addressType": obj.address_type,
        "metadata": {"name": obj.name, "namespace": obj.namespace, "labels": dict(obj.labels or {})},
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in obj.ports],
        "endpoints": endpoints,
    }


def validate(state: ClusterState, source: str = "") -> None:
    """Nothing across objects: a slice may outlive its Service for a moment (garbage collection)."""


def slices_by_service(state: ClusterState) -> dict[tuple[str, str], list[EndpointSlice]]:
    """(namespace, service) -> its slices, in name order."""
    out: dict[tuple[str, str], list[EndpointSlice]] = {}
    for s in state.of_kind("EndpointSlice"):
        if s.service:
            out.setdefault((s.namespace, s.service), []).append(s)
    return out
