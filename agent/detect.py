"""Protocol detection for an outbound connection: what the first bytes say, within a short deadline.

The byte-level decision is fastpath.detect (Cython, sans-IO); this module adds the time and memory
around it. Linkerd waits up to 10 s for a client's first bytes, which stalls server-speaks-first
protocols (MySQL, SMTP, Redis replicas...) on every connection. We wait DETECT_TIMEOUT only, and a
destination port whose clients stayed silent that long is remembered as opaque for MEMORY_TTL, so
only the first connection pays the deadline. Ports marked opaque by config (the Service annotation
`config.linkerd.io/opaque-ports`, see nodemesh/route_model.py) skip detection entirely.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nodemesh.fastpath import PROTO_HTTP1, PROTO_HTTP2, PROTO_NEED_MORE, PROTO_OPAQUE, PROTO_TLS, detect, tls_sni
from nodemesh.nodeconfig import NodeConfig

DETECT_TIMEOUT = 0.15  # s: a client-speaks-first client has sent its request by then
MEMORY_TTL = 60.0  # s: how long a silent destination port stays "server speaks first"
MEMORY_MAX = 4096  # destinations remembered (oldest forgotten first)


class Protocol(enum.Enum):
    HTTP1 = "http/1"
    HTTP2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


_BY_CODE = {PROTO_HTTP1: Protocol.HTTP1, PROTO_HTTP2: Protocol.HTTP2, PROTO_TLS: Protocol.TLS, PROTO_OPAQUE: Protocol.OPAQUE}


@dataclass(frozen=True)
class Detected:
    protocol: Protocol
    sni: str | None = None  # TLS only: the ClientHello's server name, when the record was complete
    timed_out: bool = False  # the client said nothing within the deadline


def classify(data: bytes) -> Protocol | None:
    """Protocol for the bytes seen so far, or None while they are a prefix of something we know."""
    code = detect(data) if data else PROTO_NEED_MORE
    return None if code == PROTO_NEED_MORE else _BY_CODE[code]


def conclude(data: bytes, timed_out: bool) -> Detected:
    """The verdict once bytes arrived or the deadline passed (a still-ambiguous prefix is opaque)."""
    proto = classify(data) or Protocol.OPAQUE
    sni = tls_sni(data) if proto is Protocol.TLS else None
    return Detected(proto, sni, timed_out and not data)


@dataclass
class PortMemory:
    """Destinations (ip, port) recently seen to be server-speaks-first, with an expiry each."""

    ttl: float = MEMORY_TTL
    clock: Callable[[], float] = time.monotonic
    _until: dict[tuple[str, int], float] = field(default_factory=dict)

    def is_opaque(self, dst: tuple[str, int]) -> bool:
        until = self._until.get(dst)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[dst]
            return False
        return True

    def record(self, dst: tuple[str, int], detected: Detected) -> None:
        if detected.timed_out:
            if len(self._until) >= MEMORY_MAX:
                del self._until[next(iter(self._until))]
            self._until[dst] = self.clock() + self.ttl
        else:
            self._until.pop(dst, None)  # the client spoke first after all


OPAQUE_PORTS_EXTRA = "opaque_ports"  # NodeConfig.extra key: [[cluster_ip, port], ...] (controller/routes.py)


def opaque_destinations(cfg: NodeConfig) -> frozenset[tuple[str, int]]:
    """Service VIP:ports the config marks opaque; a malformed entry is skipped on its own."""
    out: set[tuple[str, int]] = set()
    for item in cfg.extra.get(OPAQUE_PORTS_EXTRA) or ():
        try:
            ip, port = item
            out.add((str(ip), int(port)))
        except (TypeError, ValueError):
            continue
    return frozenset(out)
