"""gRPC (h2 prior knowledge) on the real lab: eBPF redirect → node proxy detects the h2 preface →
agent/h2_proxy.py balances each call across both nodes' endpoints (cross-node through the mTLS
tunnel) over ONE client connection; grpc-status in /metrics; retries on gRPC codes from
`retry.linkerd.io/grpc`. Servers and client are nodemesh/sample_h2.py in lab pods."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemesh.lab import lab
from nodemesh.scrape import total

from .labtools import cli, eventually, leftovers, metrics, pod_exec, pod_yaml, requires_root, service_yaml, two_node_lab

pytestmark = [pytest.mark.e2e, requires_root]


def _pod(name: str, app: str, node: str, args: str = "") -> str:
    return pod_yaml(name, app, node, sa="grpc", command="sample-h2-server", port_name="grpc", args=args)


def _svc(name: str, ip: str, app: str) -> str:
    return service_yaml(name, ip, app, "grpc")


LAB = two_node_lab("grpc") + "".join([
    _svc("grpc", "10.96.0.20", "grpc"), _pod("grpc-1", "grpc", "node1"), _pod("grpc-2", "grpc", "node2"),
    _svc("grpc-down", "10.96.0.21", "grpc-down"), _pod("grpc-down-1", "grpc-down", "node2", ', "--fail-rate", "1", "--fail-code", "14"'),
    _svc("grpc-flaky", "10.96.0.22", "grpc-flaky"), _pod("grpc-flaky-1", "grpc-flaky", "node1", ', "--fail-rate", "0.3"'),
    _pod("grpc-flaky-2", "grpc-flaky", "node2", ', "--fail-rate", "0.3"'),
])

ROUTES = textwrap.dedent("""
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: flaky-grpc-retry
      namespace: demo
      annotations: {retry.linkerd.io/grpc: unavailable, retry.linkerd.io/limit: "4"}
    spec:
      parentRefs: [{group: core, kind: Service, name: grpc-flaky, port: 80}]
      rules: [{backendRefs: [{name: grpc-flaky, port: 80}]}]
""")


def calls(vip: str, count: int, concurrency: int = 8) -> dict[str, Any]:
    proc = pod_exec("client", "nodemesh", "sample-h2-client", f"http://{vip}:80", "--count", str(count), "--concurrency", str(concurrency), timeout=120)
    assert proc.stdout, proc.stderr.decode()
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def grpc_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("grpc")
    (d / "lab.yaml").write_text(LAB)
    (d / "routes.yaml").write_text(ROUTES)
    lab.down()
    lab.up(str(d / "lab.yaml"))
    try:
        out = cli("lab", "apply", "-f", str(d / "routes.yaml"))
        assert out.returncode == 0, out.stderr
        # the route reached node1's agent: calls to grpc-flaky are counted under its name
        eventually(lambda: calls("10.96.0.22", 1) and total(metrics("node1"), "route_request_total", {"route": "demo/flaky-grpc-retry"}) > 0,
                   timeout=20, interval=0.5)
        yield d
    finally:
        lab.down()
        assert leftovers() == []


def test_grpc_calls_are_balanced_per_request_across_both_nodes(grpc_lab: Path) -> None:
    before = metrics("node1")
    out = calls("10.96.0.20", 200)
    assert out["errors"] == 0 and out["grpc_status"] == {"0": 200}, out
    pods = out["pods"]
    assert set(pods) == {"grpc-1", "grpc-2"} and min(pods.values()) >= 10, pods  # one connection, both nodes
    after = metrics("node1")
    ok = {"direction": "outbound", "dst_service": "grpc", "grpc_status_code": "0", "classification": "success", "status_code": "200"}
    assert total(after, "response_total", ok) - total(before, "response_total", ok) == 200
    assert total(after, "request_total", {"dst_service": "grpc"}) - total(before, "request_total", {"dst_service": "grpc"}) == 200


def test_grpc_failures_are_recorded_with_their_status(grpc_lab: Path) -> None:
    before = metrics("node1")
    out = calls("10.96.0.21", 20, concurrency=2)
    assert out["grpc_status"] == {"14": 20}, out
    after = metrics("node1")
    fail = {"dst_service": "grpc-down", "grpc_status_code": "14", "classification": "failure"}
    assert total(after, "response_total", fail) - total(before, "response_total", fail) == 20


def test_grpc_retries_on_unavailable_mask_30_percent_failures(grpc_lab: Path) -> None:
    before = metrics("node1")
    out = calls("10.96.0.22", 300)
    ok = out["grpc_status"].get("0", 0)
    assert ok >= 0.99 * 300, out
    after = metrics("node1")
    retries = total(after, "route_retry_total", {"route": "demo/flaky-grpc-retry"}) - total(before, "route_retry_total", {"route": "demo/flaky-grpc-retry"})
    assert 30 <= retries <= 0.2 * 300 + 100, retries  # ~30% retried, within the budget (20% + 10/s floor)
