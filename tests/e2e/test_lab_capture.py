"""Inbound capture on the real lab: connections that dial a meshed pod's IP around the mesh (a
process in a pod netns but outside the mesh cgroup, another node's host network) are DNATed in the
node netns to the inbound proxy's capture listener, authorized as unauthenticated clients and
refused under `strict` (all-authenticated); the proxy's own connections are not captured again.
Runs in the redirect mode NODEMESH_LAB_REDIRECT selects (bpf by default, iptables too)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab import lab
from nodemesh.scrape import total

from .labtools import client_summary, eventually, leftovers, metrics, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

HELLO1 = "10.244.1.2"  # hello-1 on node1 (the default lab's placement)

STRICT = """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {nodemesh.io/mesh: enabled}
  annotations: {config.nodemesh.io/default-inbound-policy: all-authenticated}
"""

PROBE = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print("ok" if b"hello-1" in data else "bad:" + data[:80].decode(errors="replace"))
except (ConnectionResetError, ConnectionRefusedError):
    print("reset")
"""


def _netns(kind: str, name: str) -> str:
    prefix = f"nm{os.environ.get('NODEMESH_LAB_INSTANCE', '')}"
    return f"{prefix}{kind}-{name}"


def probe_from_netns(netns: str, ip: str = HELLO1, port: int = 8080) -> str:
    """Dial from a netns WITHOUT joining any mesh cgroup (connect4 never sees this process)."""
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, ip, str(port)],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or f"error: {proc.stderr.strip().splitlines()[-1:]}"


def captured(node: str, outcome: str) -> float:
    return total(metrics(node), "nodemesh_inbound_captured_total", {"outcome": outcome})


@pytest.fixture(scope="module")
def capture_lab() -> Iterator[dict]:
    lab.down()
    lab.up()
    try:
        # the sample servers start after the agents are ready: wait until hello-1 answers
        eventually(lambda: client_summary("client", f"http://{HELLO1}:8080/", 1)["ok"] == 1, timeout=15)
        yield lab.status()
    finally:
        lab.down()
        assert leftovers() == []


def _pod_netns(st: dict, pod: str) -> str:
    return next(p["netns"] for p in st["pods"] if p["name"] == pod)


def _node_netns(st: dict, node: str) -> str:
    return next(n["netns"] for n in st["nodes"] if n["name"] == node)


IPTABLES_MODE = os.environ.get("NODEMESH_LAB_REDIRECT") == "iptables"


def test_process_outside_the_mesh_cgroup_is_captured(capture_lab: dict) -> None:
    """BPF mode meshes by cgroup: this process is not meshed, so it is captured. iptables mode
    meshes by source address (like Linkerd's pod-netns rules): every process of a meshed pod is
    redirected outbound."""
    m = metrics("node1")
    before = captured("node1", "relayed")
    series = {"direction": "outbound" if IPTABLES_MODE else "inbound", "peer": "src"}
    opened = total(m, "tcp_open_total", series)
    assert probe_from_netns(_pod_netns(capture_lab, "client")) == "ok"
    eventually(lambda: total(metrics("node1"), "tcp_open_total", series) == opened + 1, timeout=5)
    assert captured("node1", "relayed") == before + (0 if IPTABLES_MODE else 1)


def test_another_nodes_host_network_is_captured(capture_lab: dict) -> None:
    before = captured("node1", "relayed")
    assert probe_from_netns(_node_netns(capture_lab, "node2")) == "ok"
    eventually(lambda: captured("node1", "relayed") == before + 1, timeout=5)


def test_meshed_traffic_is_not_captured_again(capture_lab: dict) -> None:
    before1, before2 = captured("node1", "relayed"), captured("node2", "relayed")
    # by pod IP: one same-node and one cross-node target (the balancer may keep VIP traffic local)
    for pod in ("hello-1", "hello-2"):
        ip = next(p["ip"] for p in capture_lab["pods"] if p["name"] == pod)
        summary = client_summary("client", f"http://{ip}:8080/", 3)
        assert summary["ok"] == 3 and set(summary["by_pod"]) == {pod}
    assert (captured("node1", "relayed"), captured("node2", "relayed")) == (before1, before2)


def test_strict_mode_refuses_captured_clients_and_keeps_meshed_ones(capture_lab: dict, tmp_path: Path) -> None:
    f = tmp_path / "strict.yaml"
    f.write_text(STRICT)
    lab.apply(str(f))
    eventually(lambda: probe_from_netns(_node_netns(capture_lab, "node2")) == "reset", timeout=15)
    assert captured("node1", "unauthorized") >= 1
    if not IPTABLES_MODE:
        assert probe_from_netns(_pod_netns(capture_lab, "client")) == "reset"
    summary = client_summary("client", "http://10.96.0.10/", 4)  # meshed, authenticated: still served
    assert summary["ok"] == 4
