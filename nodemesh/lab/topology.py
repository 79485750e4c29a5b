"""Addressing and naming of the standalone lab, as pure functions of indices.

Node i (1-based) gets netns `nmnode-<name>`, underlay address 172.31.255.(10+i) on the root bridge
`nm-underlay`, pod CIDR 10.244.i.0/24 on its bridge `nmbr0` (gateway .1, which is also where pods
are redirected to: the node proxy listens there). Pod k on a node gets 10.244.i.k (k >= 2).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

UNDERLAY_BRIDGE = "nm-underlay"
UNDERLAY_NET = ipaddress.IPv4Network("172.31.255.0/24")
UNDERLAY_GATEWAY = "172.31.255.1"  # the root netns end: the controller listens here
NODE_BRIDGE = "nmbr0"
NODE_NETNS_PREFIX = "nmnode-"
POD_NETNS_PREFIX = "nmpod-"
CGROUP_ROOT_NAME = "nodemesh-lab"
MAX_NODES = 200
MAX_PODS_PER_NODE = 253  # .2 .. .254


@dataclass(frozen=True)
class NodeAddressing:
    name: str
    index: int

    @property
    def netns(self) -> str:
        return f"{NODE_NETNS_PREFIX}{self.name}"

    @property
    def underlay_ip(self) -> str:
        return str(UNDERLAY_NET.network_address + 10 + self.index)

    @property
    def underlay_veth(self) -> str:
        return f"nmu{self.index}"  # root-side name; <= 15 chars

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def gateway_ip(self) -> str:
        return f"10.244.{self.index}.1"


@dataclass(frozen=True)
class PodAddressing:
    namespace: str
    name: str
    node: NodeAddressing
    index: int

    @property
    def netns(self) -> str:
        return f"{POD_NETNS_PREFIX}{self.namespace}-{self.name}"

    @property
    def ip(self) -> str:
        return f"10.244.{self.node.index}.{self.index}"

    @property
    def node_veth(self) -> str:
        return f"veth{self.index}"  # lives in the node netns, so unique per node is enough

    @property
    def cgroup_name(self) -> str:
        return f"{self.namespace}_{self.name}"


def next_free(used: set[int], first: int, last: int, what: str) -> int:
    for i in range(first, last + 1):
        if i not in used:
            return i
    raise ValueError(f"no free {what} index left ({first}..{last} all used)")
