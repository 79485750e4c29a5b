"""NodeView: the immutable lookup index the data path reads, built once per NodeConfig.

The proxy swaps a whole NodeView on each config (one attribute assignment, so a connection sees
either the old or the new view, never a mix). Lookups are dict hits; nothing here is mutated after
`from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nodemesh.nodeconfig import NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod


@dataclass(frozen=True)
class ServicePortTarget:
    """One VIP:port of a service: what a connect to that address means."""

    service: ServiceView
    port: ServicePortView

    @property
    def key(self) -> tuple[str, str, int]:
        """Balancer key: stable across configs (unlike object identity) and per service port."""
        return (self.service.namespace, self.service.name, self.port.port)


_EMPTY: Mapping = MappingProxyType({})


class NodeView:
    """Read-only index over one NodeConfig for the node `node`."""

    __slots__ = ("node", "version", "trust_domain", "_service_ports", "_vips", "_pods", "_local_pods", "_nodes")

    def __init__(
        self,
        node: str,
        version: int = 0,
        trust_domain: str = "cluster.local",
        service_ports: Mapping[tuple[str, int], ServicePortTarget] = _EMPTY,
        pods: Mapping[str, WorkloadPod] = _EMPTY,
        nodes: Mapping[str, NodeInfo] = _EMPTY,
    ) -> None:
        self.node = node
        self.version = version
        self.trust_domain = trust_domain
        self._service_ports = MappingProxyType(dict(service_ports))
        self._vips = frozenset(vip for vip, _ in service_ports)
        self._pods = MappingProxyType(dict(pods))
        self._local_pods = MappingProxyType({ip: p for ip, p in pods.items() if p.node == node})
        self._nodes = MappingProxyType(dict(nodes))

    @classmethod
    def empty(cls, node: str) -> NodeView:
        """The view before the first config: nothing is meshed, every decision rejects."""
        return cls(node)

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> NodeView:
        service_ports: dict[tuple[str, int], ServicePortTarget] = {}
        for svc in cfg.services:
            if not svc.cluster_ip or svc.cluster_ip == "None":  # headless: clients dial pod IPs
                continue
            for port in svc.ports:
                service_ports[(svc.cluster_ip, port.port)] = ServicePortTarget(svc, port)
        pods = {p.ip: p for p in cfg.pods if p.ip}
        nodes = {n.name: n for n in cfg.nodes}
        return cls(cfg.node, cfg.version, cfg.trust_domain, service_ports, pods, nodes)

    def service_port(self, ip: str, port: int) -> ServicePortTarget | None:
        return self._service_ports.get((ip, port))

    def is_service_ip(self, ip: str) -> bool:
        return ip in self._vips

    def pod(self, ip: str) -> WorkloadPod | None:
        """Any meshed pod in the cluster, by IP."""
        return self._pods.get(ip)

    def local_pod(self, ip: str) -> WorkloadPod | None:
        """A meshed pod scheduled on this node, by IP."""
        return self._local_pods.get(ip)

    def node_info(self, name: str) -> NodeInfo | None:
        return self._nodes.get(name)

    @property
    def local_pods(self) -> Mapping[str, WorkloadPod]:
        return self._local_pods

    @property
    def service_ports(self) -> Mapping[tuple[str, int], ServicePortTarget]:
        return self._service_ports

    def meshed_destinations(self) -> frozenset[tuple[str, int]]:
        """What connect4 must redirect: each service VIP:port, and every meshed pod IP on all ports
        (port 0), so dialing a pod directly is meshed as well."""
        dsts = set(self._service_ports)
        dsts.update((ip, 0) for ip in self._pods)
        return frozenset(dsts)

    def __repr__(self) -> str:
        return (
            f"NodeView(node={self.node!r}, version={self.version}, service_ports={len(self._service_ports)}, "
            f"pods={len(self._pods)}, local_pods={len(self._local_pods)}, nodes={len(self._nodes)})"
        )
