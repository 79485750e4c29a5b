"""NodeProxy: the node's data plane in one object — current NodeView, balancer, metrics, and the
outbound (4140) and inbound (4143) listeners. The stack is composed here, top to bottom:

    outbound: accept → original_dst (BPF) → decide(view, balancer) → dial [→ tunnel] → relay
    inbound:  accept → handshake → local pod check → dial pod → relay
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from nodemesh.agent.balance import Balancer, RoundRobin
from nodemesh.agent.inbound import InboundConnection
from nodemesh.agent.metrics import ProxyMetrics
from nodemesh.agent.outbound import ListenerContext, OriginalDst, OutboundConnection
from nodemesh.agent.workloads import NodeView
from nodemesh.nodeconfig import NodeConfig

log = logging.getLogger(__name__)

SetMeshed = Callable[[Iterable[tuple[str, int]]], None]


@dataclass(frozen=True)
class ProxyAddresses:
    outbound: tuple[str, int]
    inbound: tuple[str, int]


class NodeProxy:
    def __init__(
        self,
        node: str,
        *,
        original_dst: OriginalDst,
        set_meshed: SetMeshed | None = None,
        balancer: Balancer | None = None,
        bpf_counters: Callable[[], Mapping[str, int]] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.node = node
        self._view = NodeView.empty(node)
        self._applied = False
        self._set_meshed = set_meshed
        self.balancer = balancer if balancer is not None else RoundRobin()
        self.metrics = ProxyMetrics(bpf_counters)
        self._connections: set[asyncio.BaseTransport] = set()
        self._ctx = ListenerContext(
            view=lambda: self._view,
            balancer=self.balancer,
            original_dst=original_dst,
            metrics=self.metrics,
            connections=self._connections,
            connect_timeout=connect_timeout,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self.addresses: ProxyAddresses | None = None

    @property
    def view(self) -> NodeView:
        return self._view

    @property
    def config_applied(self) -> bool:
        return self._applied

    @property
    def listening(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def apply_config(self, cfg: NodeConfig) -> None:
        """Swap in a new view (one assignment: connections see the old or the new, never a mix),
        then tell BPF what to redirect, so a newly redirected address is already known here.
        If BPF cannot be updated the new view stays (it is the newest truth) and the error is
        raised, so the config stream counts the version as not applied and gets it again."""
        if cfg.node != self.node:
            raise ValueError(f"config is for node {cfg.node!r}, this proxy serves {self.node!r}")
        view = NodeView.from_config(cfg)
        self._view = view
        self._applied = True
        self.metrics.config_version = cfg.version
        retain = getattr(self.balancer, "retain", None)
        if retain is not None:
            retain(t.key for t in view.service_ports.values())
        if self._set_meshed is not None:
            self._set_meshed(view.meshed_destinations())
        log.info("applied config %s", view)

    async def start(self, outbound: tuple[str, int], inbound: tuple[str, int]) -> ProxyAddresses:
        """Listen on both addresses (port 0 = ephemeral) and return the bound ones."""
        loop = asyncio.get_running_loop()
        ctx = self._ctx
        out = await loop.create_server(lambda: OutboundConnection(ctx), outbound[0], outbound[1], reuse_address=True, backlog=1024)
        self._servers.append(out)
        try:
            inb = await loop.create_server(lambda: InboundConnection(ctx), inbound[0], inbound[1], reuse_address=True, backlog=1024)
        except BaseException:
            await self.stop()
            raise
        self._servers.append(inb)
        self.addresses = ProxyAddresses(out.sockets[0].getsockname()[:2], inb.sockets[0].getsockname()[:2])
        log.info("node proxy for %s listening: outbound %s:%s, inbound %s:%s", self.node, *self.addresses.outbound, *self.addresses.inbound)
        return self.addresses

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; after `grace` seconds close what is still open (the relay closes each
        connection's upstream with it)."""
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
        if grace > 0 and self._connections:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self._connections and loop.time() < deadline:
                await asyncio.sleep(0.05)
        for t in list(self._connections):
            t.abort()  # type: ignore[attr-defined]
        for s in servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except TimeoutError:
                log.warning("listener did not close within 1s")
