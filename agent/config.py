"""The agent's settings: one frozen dataclass with typed defaults (ztunnel's `Config`, kopf's settings).

Built once at start (by the CLI from flags/env, or by the lab) and passed down; nothing reads the
environment after that.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.nodeconfig import ADMIN_PORT, CAPTURE_PORT, CONTROLLER_PORT, INBOUND_PORT, OUTBOUND_PORT, OUTBOUND_SPREAD_PORTS, TUNNEL_PORT

REDIRECT_MODES = ("auto", "bpf", "iptables")


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

    outbound_spread_ports: tuple[int, ...] = OUTBOUND_SPREAD_PORTS
    """BPF mode: more outbound listener ports; connect4 sends each original destination to one of
    them (by hash), so a pod's redirected connections do not all share one remote (ip, port) and
    its ephemeral ports do not run out on TIME_WAITs. () = the outbound port only."""

    inbound_port: int = INBOUND_PORT
    """Inbound listener port (node-to-node tunnel handshake, plaintext for now)."""

    admin: tuple[str, int] = ("0.0.0.0", ADMIN_PORT)
    """Admin server (host, port): /metrics, /ready, /live."""

    bpf: bool = True
    """Load and attach the redirect programs. False runs the proxy without capture (development);
    nothing is redirected then, and /ready does not wait for BPF."""

    bpf_pin_dir: str = ""
    """bpffs directory for this node's maps and programs ("" = none: the programs are detached when
    the agent stops). Pinned, redirection survives agent restarts and a restarted agent adopts the
    maps; `nodemesh agent uninstall` removes it."""

    sockmap: bool = False
    """The sockmap short-circuit: pod<->proxy bytes on this node go socket to socket (sk_msg).
    Off by default: an sk_msg ingress redirect has no backpressure, so a sender outpacing the proxy
    (bulk TCP to a cross-node or slow peer) queues without bound and then gets ENOMEM on write
    (measured: iperf3 through the shortcut). Faster keep-alive HTTP when on (bench: ~1.3x req/s)."""

    splice: bool = False
    """Same-node L4 kernel splice: an authorized opaque TCP connection between two local pods is
    forwarded socket to socket by an sk_skb verdict once relaying (agent/splice.py). Off by
    default for the same reason as `sockmap`: the redirect bypasses the receive-window accounting,
    so a sender faster than its receiver queues without bound in the kernel (measured: iperf3
    same-node wrote 3.1 GB while 1.6 GB arrived). Data arrives intact; memory is the risk."""

    redirect: str = "auto"
    """How pods' connects reach the outbound listener: "bpf" (cgroup connect4; the agent fails if
    it cannot load), "iptables" (nftables DNAT in the node netns + SO_ORIGINAL_DST, Linkerd's
    method moved to the node), "auto" (BPF, else iptables with one log line saying why)."""

    capture: bool = True
    """Inbound capture: connections to local meshed pods that bypass the mesh are DNATed to the
    capture listener and go through inbound authorization (agent/capture.py)."""

    capture_port: int = CAPTURE_PORT
    """Capture listener port, bound on `proxy_ip`."""

    connect_timeout: float = 5.0
    """Seconds to wait for an upstream TCP connect plus (remote) the tunnel handshake reply."""

    trust_anchor_file: str = ""
    """PEM trust bundle of the mesh CA. Set: the config stream is mTLS (bootstrapped with the
    token), workload certificates are requested from the controller and cross-node traffic goes
    through mTLS tunnels on `tunnel_port`. "" = the plaintext mesh of the foundation."""

    trust_domain: str = "cluster.local"
    """SPIFFE trust domain of this mesh; must match the controller's."""

    tunnel_port: int = TUNNEL_PORT
    """Inbound mTLS tunnel listener (HTTP/2 CONNECT, HBONE-style), bound on the inbound address."""

    identity_dir: str = ""
    """Where the agent keeps its node key and certificate across restarts (0600; the bootstrap
    token is single use). "" = memory only."""

    def __post_init__(self) -> None:
        if self.redirect not in REDIRECT_MODES:
            raise ValueError(f"unknown redirect mode {self.redirect!r}: use one of {', '.join(REDIRECT_MODES)}")

    @property
    def inbound_bind_ip(self) -> str:
        return self.inbound_ip or self.proxy_ip
