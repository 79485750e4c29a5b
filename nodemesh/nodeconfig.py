"""What the controller streams to one agent: the wire schema shared by both sides.

Frozen dataclasses with `to_dict`/`from_dict` so the stream can carry JSON and both sides agree on
one definition. A NodeConfig is complete (not a delta): an agent swaps it in atomically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OUTBOUND_PORT = 4140
INBOUND_PORT = 4143
OUTBOUND_SPREAD_PORTS = tuple(range(4150, 4165))  # BPF mode: more outbound listeners, one per destination hash (bpf/connect.c)
CAPTURE_PORT = 4145  # node proxy: connections to local meshed pods that bypassed the mesh (DNAT target)
TUNNEL_PORT = 15008
ADMIN_PORT = 4191
CONTROLLER_PORT = 8086
CONTROLLER_ADMIN_PORT = 9990


@dataclass(frozen=True)
class NodeInfo:
    name: str
    internal_ip: str
    pod_cidr: str
    inbound_port: int = INBOUND_PORT


@dataclass(frozen=True)
class Endpoint:
    namespace: str
    pod: str
    ip: str
    port: int
    node: str
    identity: str


@dataclass(frozen=True)
class ServicePortView:
    port: int
    name: str = ""
    protocol: str = "TCP"
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class ServiceView:
    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[ServicePortView, ...] = ()

    @property
    def authority(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class WorkloadPod:
    """A meshed pod anywhere in the cluster, so a pod IP dialed directly is meshed too."""

    namespace: str
    name: str
    ip: str
    node: str
    service_account: str
    identity: str


@dataclass(frozen=True)
class NodeConfig:
    version: int
    node: str
    trust_domain: str = "cluster.local"
    nodes: tuple[NodeInfo, ...] = ()
    services: tuple[ServiceView, ...] = ()
    pods: tuple[WorkloadPod, ...] = ()  # every meshed pod; those with node == self.node are local
    extra: dict[str, Any] = field(default_factory=dict)  # room for later issues' sections

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeConfig:
        return cls(
            version=int(d["version"]),
            node=str(d["node"]),
            trust_domain=str(d.get("trust_domain", "cluster.local")),
            nodes=tuple(NodeInfo(**n) for n in d.get("nodes", ())),
            services=tuple(
                ServiceView(
                    namespace=s["namespace"],
                    name=s["name"],
                    cluster_ip=s["cluster_ip"],
                    ports=tuple(
                        ServicePortView(
                            port=p["port"],
                            name=p.get("name", ""),
                            protocol=p.get("protocol", "TCP"),
                            endpoints=tuple(Endpoint(**e) for e in p.get("endpoints", ())),
                        )
                        for p in s.get("ports", ())
                    ),
                )
                for s in d.get("services", ())
            ),
            pods=tuple(WorkloadPod(**p) for p in d.get("pods", ())),
            extra=dict(d.get("extra", {})),
        )

    def local_pods(self) -> tuple[WorkloadPod, ...]:
        return tuple(p for p in self.pods if p.node == self.node)

    def node_info(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)
