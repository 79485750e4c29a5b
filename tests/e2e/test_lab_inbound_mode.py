"""Strict / permissive inbound mode on the real lab (mTLS on): a non-meshed client (another node's
host network, captured by the inbound proxy) is refused by a strict pod and served by a permissive
one in the same namespace (pod annotation over namespace annotation); meshed clients are unaffected."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab import lab
from nodemesh.scrape import total

from .labtools import client_summary, eventually, leftovers, metrics, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

STRICT_NS = """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {nodemesh.io/mesh: enabled}
  annotations: {config.nodemesh.io/inbound-mode: strict}
---
apiVersion: v1
kind: Pod
metadata:
  name: open
  namespace: demo
  labels: {app: open}
  annotations: {config.nodemesh.io/inbound-mode: permissive}
spec:
  nodeName: node1
  serviceAccountName: hello
  containers:
    - name: hello
      command: ["nodemesh", "sample-server", "--port", "8080"]
      ports: [{containerPort: 8080, name: http}]
"""

PROBE = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 8080), timeout=5)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print("ok" if data.startswith(b"HTTP/1.") and b" 200 " in data[:20] else "bad:" + data[:40].decode(errors="replace"))
except (ConnectionResetError, ConnectionRefusedError):
    print("reset")
"""


def probe(netns: str, ip: str) -> str:
    """Dial from a netns outside the mesh (no cgroup): the inbound capture path."""
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, ip], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or f"error: {proc.stderr.strip().splitlines()[-1:]}"


def plaintext(outcome: str) -> float:
    return total(metrics("node1"), "nodemesh_inbound_plaintext_total", {"outcome": outcome, "via": "captured"})


@pytest.fixture(scope="module")
def mode_lab() -> Iterator[dict]:
    lab.down()
    lab.up()
    try:
        eventually(lambda: client_summary("client", "http://10.96.0.10/", 1)["ok"] == 1, timeout=15)
        yield lab.status()
    finally:
        lab.down()
        assert leftovers() == []


def test_strict_refuses_non_meshed_permissive_serves_them_meshed_unaffected(mode_lab: dict, tmp_path: Path) -> None:
    node2 = next(n["netns"] for n in mode_lab["nodes"] if n["name"] == "node2")
    hello1 = next(p["ip"] for p in mode_lab["pods"] if p["name"] == "hello-1")
    assert probe(node2, hello1) == "ok"  # default: permissive
    allowed = plaintext("allowed")
    assert allowed >= 1

    f = tmp_path / "strict.yaml"
    f.write_text(STRICT_NS)
    lab.apply(str(f))
    open_ip = next(p["ip"] for p in lab.status()["pods"] if p["name"] == "open")
    eventually(lambda: probe(node2, hello1) == "reset", timeout=15)  # namespace strict
    assert plaintext("refused_strict") >= 1
    eventually(lambda: probe(node2, open_ip) == "ok", timeout=15)  # pod annotation: permissive
    assert plaintext("allowed") > allowed
    # Meshed clients are unaffected (any error fails here); P2C favours the same-node pod, so
    # seeing both nodes answer may take a few rounds.
    assert client_summary("client", "http://10.96.0.10/", 12, concurrency=4)["ok"] == 12
    eventually(lambda: set(client_summary("client", "http://10.96.0.10/", 12, concurrency=4)["by_node"]) == {"node1", "node2"},
               timeout=15, interval=0.5)


def test_nodemesh_check_reads_the_lab_ca_and_every_agent(mode_lab: dict) -> None:
    """`nodemesh check` (no --pre) in the lab: the lab's anchor and issuer, and each agent's leaves."""
    import json

    from .labtools import cli

    proc = cli("check", "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == data["exit_code"] == 0, proc.stdout
    kinds = [c["kind"] for c in data["checks"]]
    assert kinds[:2] == ["trust-anchor", "issuer"] and kinds.count("leaf") >= 3  # hello-1, client, hello-2 (+ open)
    assert {c["where"] for c in data["checks"] if c["kind"] == "leaf"} == {"node1", "node2"}
    table = cli("check")
    assert table.returncode == 0 and "STATUS" in table.stdout and "0 error(s)" in table.stdout
