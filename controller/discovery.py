"""Derived views of the cluster state: endpoints per service and the config one node receives.

Pure functions of a `ClusterState` (kopf's "handlers compute desired state"): no I/O, no clock, so
equal states give equal configs and every rule is a table-driven unit test.
"""

from __future__ import annotations

from nodemesh.endpointslice_model import EndpointSlice, slices_by_service
from nodemesh.model import ClusterState, Pod, Service, ServicePort, is_meshed
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

from nodemesh.controller.routes import with_routes


def _meshed_pods_with_ip(state: ClusterState) -> list[Pod]:
    # state.pods is sorted by (kind, namespace, name): the order every view below inherits.
    return [
        p for p in state.pods
        if p.pod_ip is not None and is_meshed(p, state.get("Namespace", "", p.namespace))
    ]


def _selects(service: Service, pod: Pod) -> bool:
    # An empty selector selects nothing here, as in Kubernetes: such Services get endpoints by hand.
    return (
        pod.namespace == service.namespace
        and bool(service.selector)
        and all(pod.labels.get(k) == v for k, v in service.selector.items())
    )


def _target_port(port: ServicePort, pod: Pod) -> int | None:
    """The pod's port for a service port; a named targetPort resolves through the pod's containers."""
    if isinstance(port.target_port, int):
        return port.target_port
    for c in pod.containers:
        for cp in c.ports:
            if cp.name == port.target_port and cp.protocol == port.protocol:
                return cp.container_port
    return None  # the pod does not expose that name: it is no endpoint for this port (as kube-proxy)


def _endpoints(state: ClusterState, service: Service, pods: list[Pod],
               slices: dict[tuple[str, str], list[EndpointSlice]] | None = None) -> tuple[tuple[Endpoint, ...], ...]:
    """A Service with EndpointSlices (Kubernetes) takes its endpoints from them; one without (the
    lab, or a cluster's Service before the EndpointSlice controller wrote one) from its selector."""
    own = (slices if slices is not None else slices_by_service(state)).get((service.namespace, service.name))
    if own:
        return _slice_endpoints(state, service, pods, own)
    selected = [p for p in pods if _selects(service, p)]
    out = []
    for sp in service.ports:
        eps = []
        for pod in selected:
            target = _target_port(sp, pod)
            if target is not None:
                assert pod.pod_ip is not None
                eps.append(Endpoint(
                    namespace=pod.namespace, pod=pod.name, ip=pod.pod_ip, port=target,
                    node=pod.node_name, identity=pod.identity(state.trust_domain),
                ))
        out.append(tuple(eps))
    return tuple(out)


def _slice_endpoints(state: ClusterState, service: Service, pods: list[Pod],
                     slices: list[EndpointSlice]) -> tuple[tuple[Endpoint, ...], ...]:
    """Ready IPv4 endpoints of meshed pods, per service port (matched by name and protocol, as
    kube-proxy does), deduplicated (a pod may sit in two slices while they are rebalanced) and in
    the selector path's order, so both paths give equal configs for equal clusters."""
    meshed = {(p.namespace, p.name): p for p in pods}
    out = []
    for sp in service.ports:
        eps: dict[tuple[str, str], Endpoint] = {}
        for sl in slices:
            if sl.address_type != "IPv4":
                continue  # the mesh routes IPv4 today
            port = next((p.port for p in sl.ports if p.name == sp.name and p.protocol == sp.protocol), None)
            if port is None:
                continue
            for e in sl.endpoints:
                pod = meshed.get((e.pod_namespace, e.pod)) if e.pod else None
                if not e.ready or pod is None:
                    continue  # not ready, or not a meshed pod: no identity to route to
                eps.setdefault((pod.namespace, pod.name), Endpoint(
                    namespace=pod.namespace, pod=pod.name, ip=e.addresses[0], port=port,
                    node=e.node_name or pod.node_name, identity=pod.identity(state.trust_domain),
                ))
        out.append(tuple(eps[k] for k in sorted(eps)))
    return tuple(out)


def endpoints_for(state: ClusterState, service: Service) -> tuple[tuple[Endpoint, ...], ...]:
    """Endpoints of each of `service.ports` (same order): selected, meshed pods that have an IP.

    Sorted by (namespace, pod name), so the result is deterministic.
    """
    return _endpoints(state, service, _meshed_pods_with_ip(state))


def node_config(state: ClusterState, node_name: str, version: int) -> NodeConfig:
    """The complete config for one node's agent (cluster-wide today; per-node sections come later)."""
    pods = _meshed_pods_with_ip(state)
    nodes = tuple(
        NodeInfo(name=n.name, internal_ip=n.internal_ip, pod_cidr=n.pod_cidr)
        for n in state.nodes
        if n.internal_ip and n.pod_cidr  # a node not yet addressed cannot be routed to
    )
    services = []
    slices = slices_by_service(state)
    for svc in state.services:
        if svc.cluster_ip is None:  # headless: nothing to intercept by VIP
            continue
        eps = _endpoints(state, svc, pods, slices)
        services.append(ServiceView(
            namespace=svc.namespace, name=svc.name, cluster_ip=svc.cluster_ip,
            ports=tuple(
                ServicePortView(port=sp.port, name=sp.name, protocol=sp.protocol, endpoints=e)
                for sp, e in zip(svc.ports, eps)
            ),
        ))
    workloads = tuple(
        WorkloadPod(
            namespace=p.namespace, name=p.name, ip=p.pod_ip, node=p.node_name,
            service_account=p.service_account, identity=p.identity(state.trust_domain),
        )
        for p in pods
        if p.pod_ip is not None
    )
    cfg = NodeConfig(
        version=version, node=node_name, trust_domain=state.trust_domain,
        nodes=nodes, services=tuple(services), pods=workloads,
    )
    return with_routes(cfg, state)  # HTTPRoutes and opaque ports (L7 issue)
