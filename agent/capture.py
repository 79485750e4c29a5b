"""Inbound capture: connections to a local meshed pod that did not come through a node proxy.

agent/nat_rules.py DNATs them (in the node's netns) to the capture listener (CAPTURE_PORT). Each
accepted connection is handed to the inbound path (agent/inbound.py's InboundConnection: local
pod check -> authorization -> dial the pod -> relay) with what is really known about its client:
no identity, no TLS, its real IP. So a non-meshed client is subject to the pod's policy exactly
as an unauthenticated one is, and `strict` (all-authenticated) refuses it. The inbound proxy's
own connections to the pod are never captured again: they are locally generated (nft `output`,
not `prerouting`). Refusals are resets (the client speaks the pod's protocol, not the tunnel's).

Visible in metrics as `nodemesh_inbound_captured_total{dst_namespace, outcome}` besides the usual
inbound tcp_* series.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from nodemesh.agent import nat_rules
from nodemesh.agent.handshake import TunnelRequest
from nodemesh.agent.inbound import InboundConnection
from nodemesh.agent.original_dst import original_dst
from nodemesh.agent.outbound import ListenerContext
from nodemesh.agent.nat_rules import NatRules
from nodemesh.agent.relay import reset_transport
from nodemesh.agent.workloads import NodeView
from nodemesh.nodeconfig import CAPTURE_PORT  # noqa: F401  (re-exported: the listener's default)

log = logging.getLogger(__name__)



class CaptureStats:
    """Counter of captured connections by destination namespace and outcome (a Prometheus collector)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def count(self, namespace: str, outcome: str) -> None:
        self.counts[(namespace, outcome)] += 1

    def total(self, outcome: str | None = None) -> int:
        return sum(n for (_, o), n in self.counts.items() if outcome is None or o == outcome)

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("nodemesh_inbound_captured_total",
                                  "Connections to local meshed pods that bypassed the mesh, captured by the inbound proxy",
                                  labels=("dst_namespace", "outcome"))
        for (ns, outcome), n in sorted(self.counts.items()):
            fam.add_metric((ns, outcome), n)
        yield fam


class CapturedConnection(InboundConnection):
    """One captured connection: the original destination comes from conntrack, not a handshake."""

    tunnel_reply = False

    def __init__(self, ctx: ListenerContext, stats: CaptureStats) -> None:
        super().__init__(ctx)
        self.capture_stats = stats
        self._namespace = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.connections.add(transport)
        sock = transport.get_extra_info("socket")
        dst = original_dst(sock) if sock is not None else None
        if dst is None:
            self._refuse(0, "no original destination (not a DNATed connection)", "no_original_dst")
            return
        pod = self.ctx.view().local_pod(dst[0])
        self._namespace = pod.namespace if pod is not None else ""
        # No claimed identity: a captured client is unauthenticated by construction.
        self.request = TunnelRequest(dst[0], dst[1], src_identity=None)
        self.src_identity = None
        self.transport.pause_reading()  # until the pod answers; the kernel buffers meanwhile
        self._task = asyncio.get_running_loop().create_task(self._run(self.request))

    async def _run(self, req: TunnelRequest) -> None:
        await self._connect(req)
        if not self.transport.is_closing():
            self.capture_stats.count(self._namespace, "relayed")

    def _refuse(self, status: int, reason: str, error: str) -> None:
        if self.transport.is_closing():
            return
        self._open_stats(self._namespace)
        self.ctx.metrics.error("inbound", error)
        self.capture_stats.count(self._namespace, error)
        log.info("captured connection from %s refused: %s", self.transport.get_extra_info("peername"), reason)
        reset_transport(self.transport)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # request is always set: keep the write side for the pod's answer


class NatCapture:
    """Keeps the node netns's NAT table (agent/nat_rules.py) in step with the config: capture for
    local meshed pods always, plus the outbound redirect of meshed pods' connects in fallback mode
    (`redirect=True`). Rules are re-installed only when they change (one nft transaction)."""

    def __init__(self, proxy_ip: str, capture_port: int, outbound_port: int, *, redirect: bool, capture: bool = True) -> None:
        self.capture = capture
        self.proxy_ip = proxy_ip
        self.capture_port = capture_port
        self.outbound_port = outbound_port
        self.redirect = redirect
        self.installed: NatRules | None = None

    def rules_for(self, view: NodeView) -> NatRules:
        local = frozenset(view.local_pods)
        captured = local if self.capture else frozenset()
        if not self.redirect:
            return NatRules(self.proxy_ip, self.capture_port, captured)
        return NatRules(self.proxy_ip, self.capture_port, captured, outbound_port=self.outbound_port,
                        redirect_sources=local, redirect_dsts=view.meshed_destinations())

    def update(self, view: NodeView) -> None:
        """Install the rules `view` calls for; NatRulesError (the config is then not applied) on failure."""
        rules = self.rules_for(view)
        if rules == self.installed:
            return
        nat_rules.apply(rules)
        self.installed = rules
        log.info("NAT rules: capture %d local pod(s)%s", len(rules.capture_pods),
                 f", redirect {len(rules.redirect_sources)} pod(s) to {len(rules.redirect_dsts)} destination(s)" if self.redirect else "")

    def remove(self) -> None:
        nat_rules.remove()
        self.installed = None
