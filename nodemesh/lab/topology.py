"""Addressing and naming of the standalone lab, as pure functions of indices.

Node i (1-based) gets netns `nmnode-<name>`, underlay address 172.31.255.(10+i) on the root bridge
`nm-underlay`, pod CIDR 10.244.i.0/24 on its bridge `nmbr0` (gateway .1, which is also where pods
are redirected to: the node proxy listens there). Pod k on a node gets 10.244.i.k (k >= 2).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

# NODEMESH_LAB_INSTANCE=k (0-9) runs a separate lab beside the default one (k=0), e.g. a bench
# while tests run. Only what lives in the shared root netns, cgroupfs and bpffs needs its own
# name or range; pods and nodes are netns of their own, so their addresses may repeat.
INSTANCE = int(os.environ.get("NODEMESH_LAB_INSTANCE", "0"))
if not 0 <= INSTANCE <= 9:
    raise ValueError(f"NODEMESH_LAB_INSTANCE must be 0-9, got {INSTANCE}")
_P = "nm" if INSTANCE == 0 else f"nm{INSTANCE}"
_SUFFIX = "" if INSTANCE == 0 else str(INSTANCE)

UNDERLAY_BRIDGE = f"{_P}-underlay"
UNDERLAY_NET = ipaddress.IPv4Network(f"172.31.{255 - INSTANCE}.0/24")
UNDERLAY_GATEWAY = str(UNDERLAY_NET.network_address + 1)  # the root netns end: the controller listens here
NODE_BRIDGE = "nmbr0"
NODE_NETNS_PREFIX = f"{_P}node-"
POD_NETNS_PREFIX = f"{_P}pod-"
UNDERLAY_VETH_PREFIX = f"{_P}u"
CGROUP_ROOT_NAME = f"nodemesh-lab{_SUFFIX}"
BPF_PIN_ROOT = f"/sys/fs/bpf/nodemesh{_SUFFIX}"
DEFAULT_LAB_DIR = f"/run/nodemesh/lab{_SUFFIX}"
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
        return f"{UNDERLAY_VETH_PREFIX}{self.index}"  # root-side name; <= 15 chars

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
