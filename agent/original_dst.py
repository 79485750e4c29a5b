"""SO_ORIGINAL_DST: the address a NATed connection was dialed to, from conntrack.

Works on an accepted socket of the netns whose conntrack did the DNAT (agent/nat_rules.py puts it
in the node's netns, where the node proxy listens). `parse` is pure; `original_dst` does the call.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; not exported by Python's socket module
_SOCKADDR_IN = 16  # struct sockaddr_in: family (host order), port (network), addr, 8 bytes zero


def parse(raw: bytes) -> tuple[str, int]:
    """A struct sockaddr_in as getsockopt returns it -> (ip, port); ValueError if it is not one."""
    if len(raw) < 8:
        raise ValueError(f"SO_ORIGINAL_DST returned {len(raw)} bytes, expected a {_SOCKADDR_IN}-byte sockaddr_in")
    family = struct.unpack_from("=H", raw)[0]
    if family != socket.AF_INET:
        raise ValueError(f"SO_ORIGINAL_DST returned address family {family}, expected AF_INET ({int(socket.AF_INET)})")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The pre-DNAT destination of an accepted IPv4 TCP socket; None when it was not NATed
    (conntrack has no entry, or the original destination is the socket's own address)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
    except OSError:  # ENOENT: no conntrack entry
        return None
    dst = parse(raw)
    if dst == sock.getsockname()[:2]:
        return None
    return dst
