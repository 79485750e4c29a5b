"""Choosing how pods' connections reach the node proxy: eBPF (cgroup connect4) or the nftables
fallback (DNAT in the node netns, agent/nat_rules.py), plus inbound capture in both modes.

`--redirect=auto` (default) tries BPF and, when the programs cannot be loaded or the kernel rejects
one (agent/bpf_loader.BpfUnavailable / ProgramRejected, which name the program and the verifier's
words), falls back to iptables mode with ONE warning line saying why. `bpf` refuses to fall back;
`iptables` never tries BPF. `--no-bpf` (development) redirects and captures nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nodemesh.agent.capture import NatCapture
from nodemesh.agent.config import AgentConfig

if TYPE_CHECKING:
    from nodemesh.agent.bpf_loader import RedirectPrograms

log = logging.getLogger("nodemesh.agent")


def _nat(cfg: AgentConfig, *, redirect: bool) -> NatCapture:
    return NatCapture(cfg.proxy_ip, cfg.capture_port, cfg.outbound_port, redirect=redirect, capture=cfg.capture)


def choose_redirect(cfg: AgentConfig) -> tuple[RedirectPrograms | None, NatCapture | None]:
    """(loaded BPF programs or None, NAT manager or None) for `cfg`; raises BpfUnavailable only
    in `bpf` mode. The NAT rules themselves are installed with the first config."""
    if not cfg.bpf:
        return None, None
    if cfg.redirect == "iptables":
        log.warning("redirect mode: iptables (forced by --redirect=iptables): nftables DNAT in this netns, "
                    "original destinations from conntrack; no sockmap shortcut, no getpeername transparency")
        return None, _nat(cfg, redirect=True)
    from nodemesh.agent.bpf_loader import BpfUnavailable, RedirectPrograms

    exempt = (cfg.agent_cgroup_path,) if cfg.agent_cgroup_path else ()
    progs = RedirectPrograms(cfg.cgroup_path, cfg.proxy_ip, cfg.outbound_port, exempt_cgroup_paths=exempt,
                             pin_dir=cfg.bpf_pin_dir or None, shortcut=cfg.sockmap, splice=cfg.splice,
                             spread_ports=cfg.outbound_spread_ports)
    try:
        progs.load()
    except BpfUnavailable as exc:
        if cfg.redirect == "bpf":
            raise  # a PreflightError: run() logs it and exits 3
        log.warning("redirect mode: iptables (BPF unavailable: %s); falling back to nftables DNAT in this netns", exc)
        return None, _nat(cfg, redirect=True)
    return progs, (_nat(cfg, redirect=False) if cfg.capture else None)
