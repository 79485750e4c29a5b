"""nftables NAT rules in the node's network namespace: inbound capture and the iptables fallback.

Why NAT in the node netns (not in each pod's netns): the node proxy is one process in the node's
netns; a REDIRECT inside a pod's netns could only reach a listener in that same netns, and
SO_ORIGINAL_DST answers only on a socket of the netns whose conntrack did the NAT. Every packet a
pod exchanges with anything off its own netns crosses the node netns, routed (to another node, to a
service VIP) or bridged (to a pod on the same bridge; br_netfilter hands bridged IPv4 frames to the
node's `prerouting` hook). So one `dnat` there sends the connection to a node-proxy listener, and
`getsockopt(SO_ORIGINAL_DST)` on the accepted socket gives back the pod address that was dialed.

Two rule sets share one table (`ip nodemesh`), replaced atomically on each config:
- capture (always): a NEW TCP connection to a meshed pod on this node that did not come from the
  node proxy (the proxy's own connects are locally generated: they take the `output` hook, never
  `prerouting`) goes to the capture listener, so authorization and strict mode cannot be bypassed
  by dialing a pod IP from a non-meshed pod, another node, or a process outside the mesh cgroup;
- redirect (fallback mode only, Linkerd-style but at the node): connections FROM this node's meshed
  pods to meshed destinations (service VIP:port, meshed pod IP) go to the outbound listener, as
  connect4 does in BPF mode. It comes first, so a meshed pod dialing a local pod is outbound traffic.

`render` is pure (table-driven tests); `apply`/`remove` run `nft -f -` (one transaction each).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from nodemesh.errors import NodemeshError

log = logging.getLogger(__name__)

TABLE = "nodemesh"


class NatRulesError(NodemeshError):
    """nft refused the rules or is missing; the message names the command and nft's words."""


@dataclass(frozen=True)
class NatRules:
    """What the node's NAT table holds. Addresses are IPv4 strings; ports 1..65535."""

    proxy_ip: str  # the node proxy's address reachable from pods (lab: the pod bridge gateway)
    capture_port: int  # capture listener (connections to local meshed pods that bypassed the mesh)
    capture_pods: frozenset[str] = frozenset()  # meshed pod IPs on this node
    # Fallback mode only (empty in BPF mode):
    outbound_port: int = 0  # outbound listener (the connect4 target in BPF mode)
    redirect_sources: frozenset[str] = frozenset()  # meshed pod IPs on this node (their clients)
    redirect_dsts: frozenset[tuple[str, int]] = field(default_factory=frozenset)  # (ip, port); port 0 = all


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"not an IPv4 address: {value!r}") from None


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"invalid {what} {value!r}: must be a TCP port 1..65535")
    return value


def render(rules: NatRules) -> str:
    """The nft script that replaces table `ip nodemesh` with `rules` in one transaction."""
    proxy = _ip(rules.proxy_ip)
    capture_port = _port(rules.capture_port, "capture port")
    capture = sorted({_ip(ip) for ip in rules.capture_pods}, key=ipaddress.IPv4Address)
    sources = sorted({_ip(ip) for ip in rules.redirect_sources}, key=ipaddress.IPv4Address)
    any_port = sorted({_ip(ip) for ip, port in rules.redirect_dsts if port == 0}, key=ipaddress.IPv4Address)
    with_port = sorted({(_ip(ip), _port(port, "destination port")) for ip, port in rules.redirect_dsts if port != 0},
                       key=lambda t: (ipaddress.IPv4Address(t[0]), t[1]))
    redirect = bool(sources)
    if redirect:
        _port(rules.outbound_port, "outbound port")

    lines = [
        f"table ip {TABLE} {{}}",  # make sure it exists, so the delete below cannot fail
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  set capture_pods {", "    type ipv4_addr",
        *([f"    elements = {{ {', '.join(capture)} }}"] if capture else []), "  }",
    ]
    if redirect:
        lines += [
            "  set redirect_sources {", "    type ipv4_addr", f"    elements = {{ {', '.join(sources)} }}", "  }",
            "  set redirect_ips {", "    type ipv4_addr",
            *([f"    elements = {{ {', '.join(any_port)} }}"] if any_port else []), "  }",
            "  set redirect_ports {", "    type ipv4_addr . inet_service",
            *([f"    elements = {{ {', '.join(f'{ip} . {port}' for ip, port in with_port)} }}"] if with_port else []), "  }",
        ]
    lines += ["  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;"]
    if redirect:
        lines += [
            f"    ip saddr @redirect_sources ip daddr . tcp dport @redirect_ports dnat to {proxy}:{rules.outbound_port}",
            f"    ip saddr @redirect_sources ip daddr @redirect_ips meta l4proto tcp dnat to {proxy}:{rules.outbound_port}",
        ]
    lines += [f"    ip daddr @capture_pods meta l4proto tcp dnat to {proxy}:{capture_port}", "  }", "}"]
    return "\n".join(lines) + "\n"


def _nft(script: str, what: str) -> None:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NatRulesError(f"cannot {what}: the `nft` command is missing; install nftables (`make setup`)") from None
    if proc.returncode != 0:
        raise NatRulesError(f"cannot {what}: nft said: {proc.stderr.strip() or proc.stdout.strip()}")


def apply(rules: NatRules) -> None:
    """Replace this netns's `ip nodemesh` table with `rules` (atomic: one nft transaction)."""
    _nft(render(rules), f"install the NAT rules of table ip {TABLE}")


def present() -> bool:
    """Whether this netns holds our table (False also when nft is missing: then nothing was installed)."""
    try:
        proc = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return False
    return proc.returncode == 0


def remove() -> None:
    """Delete table `ip nodemesh` from this netns (idempotent)."""
    _nft(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n", f"remove table ip {TABLE}")
