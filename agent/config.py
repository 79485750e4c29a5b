"""The agent's settings: one frozen dataclass with typed defaults (ztunnel's `Config`, kopf's settings).

Built once at start (by the CLI from flags/env, or by the lab) and passed down; nothing reads the
environment after that.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.nodeconfig import ADMIN_PORT, CONTROLLER_PORT, INBOUND_PORT, OUTBOUND_PORT


@dataclass(frozen=True)
class AgentConfig:
    node: str
    """Name of the node this agent serves; the controller streams this node's NodeConfig."""

    controller: tuple[str, int] = ("127.0.0.1", CONTROLLER_PORT)
    """Controller config-stream address (host, port)."""

    token_file: str = "/var/run/nodemesh/token"
    """File holding the node's bootstrap token (standalone) or projected SA token (Kubernetes)."""

    cgroup_path: str = "/sys/fs/cgroup"
    """cgroup v2 directory of the node; connect4/sock_ops attach here and are inherited by pods."""

    agent_cgroup_path: str = ""
    """cgroup of the agent itself, exempted from redirection so the proxy's own connects go out
    unchanged ("" = none, e.g. when the agent runs outside `cgroup_path`)."""

    proxy_ip: str = "127.0.0.1"
    """Address pods are redirected to and the outbound listener binds (the node's pod-bridge
    gateway IP in the lab); it must be reachable from every pod netns of the node."""

    inbound_ip: str = ""
    """Address the inbound listener binds, reached by other nodes' proxies at the node's
    `internal_ip` ("" = same as `proxy_ip`). Never a wildcard in the lab: several agents share
    one root netns there."""

    outbound_port: int = OUTBOUND_PORT
    """Outbound listener port: the redirect target of connect4."""

    inbound_port: int = INBOUND_PORT
    """Inbound listener port (node-to-node tunnel handshake, plaintext for now)."""

    admin: tuple[str, int] = ("0.0.0.0", ADMIN_PORT)
    """Admin server (host, port): /metrics, /ready, /live."""

    bpf: bool = True
    """Load and attach the redirect programs. False runs the proxy without capture (development);
    nothing is redirected then, and /ready does not wait for BPF."""

    connect_timeout: float = 5.0
    """Seconds to wait for an upstream TCP connect plus (remote) the tunnel handshake reply."""

    @property
    def inbound_bind_ip(self) -> str:
        return self.inbound_ip or self.proxy_ip
