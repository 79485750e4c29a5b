"""`nodemesh agent uninstall` removes the node's NAT table too (inbound capture / iptables fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from nodemesh.cgroups import cgroup2_mount

from .labtools import requires_root

pytestmark = [pytest.mark.e2e, requires_root]

NETNS = f"nmt-uninst{os.environ.get('NODEMESH_LAB_INSTANCE', '0')}"


def in_netns(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", *argv], capture_output=True, text=True, timeout=60)


def test_uninstall_removes_the_nat_table(tmp_path) -> None:
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        install = textwrap.dedent("""
            from nodemesh.agent.nat_rules import NatRules, apply
            apply(NatRules(proxy_ip="10.244.1.1", capture_port=4145, capture_pods=frozenset({"10.244.1.2"})))
        """)
        assert in_netns(sys.executable, "-c", install).returncode == 0
        assert in_netns("nft", "list", "table", "ip", "nodemesh").returncode == 0
        cg = os.path.join(cgroup2_mount(), NETNS)  # an empty cgroup: only the table is there to remove
        os.makedirs(cg, exist_ok=True)
        out = in_netns(sys.executable, "-m", "nodemesh", "agent", "uninstall", "--node", "n1", "--cgroup", cg,
                       "--bpf-pin-dir", str(tmp_path / "pins"))
        assert out.returncode == 0, out.stderr
        assert "nftables table ip nodemesh" in out.stdout
        assert in_netns("nft", "list", "table", "ip", "nodemesh").returncode != 0
        again = in_netns(sys.executable, "-m", "nodemesh", "agent", "uninstall", "--node", "n1", "--cgroup", cg,
                         "--bpf-pin-dir", str(tmp_path / "pins"))
        assert again.returncode == 0 and "nothing of node n1" in again.stdout
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)
        if os.path.isdir(os.path.join(cgroup2_mount(), NETNS)):
            os.rmdir(os.path.join(cgroup2_mount(), NETNS))
