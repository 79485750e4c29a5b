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
from typing import Any

from nodemesh.agent.authorizer import Authorizer
from nodemesh.agent.balance import Balancer, RoundRobin
from nodemesh.agent.h2_proxy import H2Proxy
from nodemesh.agent.http_proxy import HttpProxy
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
        self.authz = Authorizer()
        self.metrics.registry.register(self.authz)
        self.l7 = HttpProxy(self.metrics, connect_timeout)  # HTTP/1 detected on service ports
        self.l7.h2 = self.h2 = H2Proxy(self.l7, connect_timeout)  # the h2 preface (gRPC) detected on them
        self._ctx = ListenerContext(
            view=lambda: self._view,
            balancer=self.balancer,
            original_dst=original_dst,
            metrics=self.metrics,
            connections=self._connections,
            connect_timeout=connect_timeout,
            authz=self.authz,
            l7=self.l7,
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
        # Policy with the view it belongs to; a malformed policy keeps the last good one. Live
        # connections the new policy refuses are cut here, synchronously.
        self.authz.apply(cfg, self._live_transports())
        self.l7.apply_config(cfg)
        self._applied = True
        self.metrics.config_version = cfg.version
        retain = getattr(self.balancer, "retain", None)
        if retain is not None:
            retain(t.key for t in view.service_ports.values())
        if self._set_meshed is not None:
            self._set_meshed(view.meshed_destinations())
        log.info("applied config %s", view)

    async def enable_mtls(self, identity: Any, listen: tuple[str, int], tunnel_addr: Any = None) -> tuple[str, int]:
        """Cross-node traffic over mTLS HTTP/2 tunnels (agent/tunnel.py) from here on: outbound
        remote plans go only through the pool, inbound tunnels are served on `listen` (15008).
        Call before start(). Returns the bound tunnel address."""
        from dataclasses import replace

        from nodemesh.agent.identity_metrics import IdentityCollector
        from nodemesh.agent.tunnel import MeshTls, TunnelPool, TunnelServer, default_tunnel_addr

        self.metrics.registry.register(IdentityCollector(identity))
        tls = MeshTls(identity)
        self.tunnels = TunnelPool(identity, tls, tunnel_addr or default_tunnel_addr)
        self._ctx = replace(self._ctx, tunnels=self.tunnels)
        self.tunnel_server = TunnelServer(self._ctx, identity, tls)
        return await self.tunnel_server.start(*listen)

    def _live_transports(self) -> list[asyncio.BaseTransport]:
        """Accepted connections plus inbound mTLS tunnel streams: what authorization re-checks."""
        live: list[asyncio.BaseTransport] = list(self._connections)
        server = getattr(self, "tunnel_server", None)
        if server is not None:
            live += [st for mux in list(server.muxes) for st in list(mux.streams.values())]  # type: ignore[misc]
        return live

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

    def use_conntrack_original_dst(self) -> None:
        """iptables mode: outbound connections were DNATed in this netns; their original
        destination comes from conntrack (SO_ORIGINAL_DST). Call before start()."""
        from dataclasses import replace

        from nodemesh.agent.original_dst import original_dst

        self._ctx = replace(self._ctx, original_dst_of_socket=original_dst)

    def enable_splice(self, splicer: Any) -> None:
        """Hand same-node opaque TCP connections to the kernel (agent/splice.py). Call before start()."""
        from dataclasses import replace

        self._ctx = replace(self._ctx, splicer=splicer)
        self.metrics.registry.register(splicer)

    async def listen_extra(self, protocol: Callable[[ListenerContext], asyncio.Protocol], addr: tuple[str, int]) -> tuple[str, int]:
        """One more listener sharing this proxy's context (agent/capture.py's), stopped with the
        others. Call after enable_mtls/start. Returns the bound address."""
        ctx = self._ctx
        srv = await asyncio.get_running_loop().create_server(lambda: protocol(ctx), addr[0], addr[1], reuse_address=True, backlog=1024)
        self._servers.append(srv)
        return srv.sockets[0].getsockname()[:2]

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; after `grace` seconds close what is still open (the relay closes each
        connection's upstream with it)."""
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
        if getattr(self, "tunnel_server", None) is not None:
            await self.tunnel_server.close()
            self.tunnels.close()
        self.l7.close()  # idle pooled upstream connections
        self.h2.close()
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
