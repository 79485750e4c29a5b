"""Network namespaces, bridges, veths and routes of the lab, through pyroute2 (netlink)."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterable

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from nodemesh.lab.topology import INSTANCE, NODE_BRIDGE, UNDERLAY_BRIDGE, UNDERLAY_GATEWAY, UNDERLAY_NET, NodeAddressing, PodAddressing

NETNS_DIR = "/run/netns"


def bridge_mac(instance: int, index: int) -> str:
    """A fixed, locally administered MAC for a lab bridge. Without one, Linux gives a bridge the
    lowest MAC among its ports, so adding a pod can change the gateway's MAC under the pods' ARP
    caches and cut them off from their node (seen: a pod added by `lab apply` did that half the time)."""
    return f"02:6e:6d:{instance:02x}:{index >> 8:02x}:{index & 0xFF:02x}"


def _index(ipr: IPRoute | NetNS, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _sysctl_in(ns: str, setting: str) -> None:
    subprocess.run(["nsenter", f"--net={NETNS_DIR}/{ns}", "sysctl", "-qw", setting], check=True)


def ensure_underlay() -> None:
    """The root-netns bridge joining all nodes (the lab's 'physical network')."""
    with IPRoute() as ip:
        if _index(ip, UNDERLAY_BRIDGE) is None:
            ip.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge", address=bridge_mac(INSTANCE, 0))
        idx = _index(ip, UNDERLAY_BRIDGE)
        try:
            ip.addr("add", index=idx, address=UNDERLAY_GATEWAY, prefixlen=UNDERLAY_NET.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ip.link("set", index=idx, state="up")


def forward_rule_needed() -> bool:
    """br_netfilter makes root iptables see bridged frames; a DROP policy (e.g. docker's) would cut nodes apart."""
    try:
        out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "-P FORWARD ACCEPT" not in out


FORWARD_RULE = ["FORWARD", "-i", UNDERLAY_BRIDGE, "-o", UNDERLAY_BRIDGE, "-j", "ACCEPT"]


def add_forward_rule() -> None:
    subprocess.run(["iptables", "-I", *FORWARD_RULE], check=True)


def remove_forward_rule() -> None:
    subprocess.run(["iptables", "-D", *FORWARD_RULE], capture_output=True)


def create_node(node: NodeAddressing) -> None:
    """A node's 'host network': its netns, an underlay NIC and the bridge its pods hang off."""
    if node.netns not in netns.listnetns():
        netns.create(node.netns)
    with IPRoute() as ip:
        if _index(ip, node.underlay_veth) is None:
            ip.link("add", ifname=node.underlay_veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": node.netns})
        idx = _index(ip, node.underlay_veth)
        ip.link("set", index=idx, master=_index(ip, UNDERLAY_BRIDGE), state="up")
    with NetNS(node.netns) as ns:
        ns.link("set", index=_index(ns, "lo"), state="up")
        eth0 = _index(ns, "eth0")
        _add_addr(ns, eth0, node.underlay_ip, UNDERLAY_NET.prefixlen)
        ns.link("set", index=eth0, state="up")
        if _index(ns, NODE_BRIDGE) is None:
            ns.link("add", ifname=NODE_BRIDGE, kind="bridge", address=bridge_mac(INSTANCE, node.index))
        br = _index(ns, NODE_BRIDGE)
        _add_addr(ns, br, node.gateway_ip, 24)
        ns.link("set", index=br, state="up")
    # The node routes between its pods and the underlay, as a Kubernetes node does.
    _sysctl_in(node.netns, "net.ipv4.ip_forward=1")


def set_node_routes(node: NodeAddressing, others: Iterable[NodeAddressing]) -> None:
    """Pod CIDRs of other nodes go via those nodes' underlay addresses (a flat, routed pod network)."""
    with NetNS(node.netns) as ns:
        for other in others:
            if other.name == node.name:
                continue
            try:
                ns.route("replace", dst=other.pod_cidr, gateway=other.underlay_ip)
            except NetlinkError as exc:
                raise RuntimeError(f"cannot route {other.pod_cidr} via {other.underlay_ip} in {node.netns}: {exc}") from exc


def create_pod(pod: PodAddressing) -> None:
    if pod.netns not in netns.listnetns():
        netns.create(pod.netns)
    with NetNS(pod.node.netns) as ns:
        if _index(ns, pod.node_veth) is None:
            ns.link("add", ifname=pod.node_veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
        ns.link("set", index=_index(ns, pod.node_veth), master=_index(ns, NODE_BRIDGE), state="up")
    with NetNS(pod.netns) as ns:
        ns.link("set", index=_index(ns, "lo"), state="up")
        eth0 = _index(ns, "eth0")
        _add_addr(ns, eth0, pod.ip, 24)
        ns.link("set", index=eth0, state="up")
        ns.route("replace", dst="0.0.0.0/0", gateway=pod.node.gateway_ip)


def _add_addr(ns: IPRoute | NetNS, index: int, address: str, prefixlen: int) -> None:
    try:
        ns.addr("add", index=index, address=address, prefixlen=prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def delete_netns(name: str) -> None:
    """Idempotent. Veths inside die with the namespace once no process holds it."""
    if name in netns.listnetns():
        netns.remove(name)


def delete_link(ifname: str) -> None:
    with IPRoute() as ip:
        idx = _index(ip, ifname)
        if idx is not None:
            try:
                ip.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise


def list_netns(prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(prefixes))


def link_exists(ifname: str) -> bool:
    with IPRoute() as ip:
        return _index(ip, ifname) is not None
