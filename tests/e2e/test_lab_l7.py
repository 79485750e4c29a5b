"""L7 on the real lab (eBPF redirect → node proxy → pods), with HTTPRoutes applied through
`nodemesh lab apply` and the sample server's latency/failure injection: traffic split, retries
within the budget, route timeout, P2C-EWMA around a slow endpoint, golden metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemesh.lab import lab
from nodemesh.scrape import total

from .labtools import cli, eventually, leftovers, metrics, pod_exec, pod_yaml, requires_root, service_yaml, two_node_lab

pytestmark = [pytest.mark.e2e, requires_root]


def _pod(name: str, app: str, node: str, args: str = "") -> str:
    return pod_yaml(name, app, node, sa="hello", command="sample-server", port_name="http", args=args)


def _svc(name: str, ip: str, app: str) -> str:
    return service_yaml(name, ip, app, "http")


LAB = two_node_lab("hello") + "".join([
    _svc("hello", "10.96.0.10", "hello"), _pod("hello-1", "hello", "node1"), _pod("hello-2", "hello", "node2"),
    _svc("hello-v2", "10.96.0.11", "hello-v2"), _pod("hello-v2-1", "hello-v2", "node2"),
    _svc("mixed", "10.96.0.12", "mixed"), _pod("fast-1", "mixed", "node1"), _pod("slow-1", "mixed", "node2", ', "--latency-ms", "50"'),
    _svc("flaky", "10.96.0.13", "flaky"), _pod("flaky-1", "flaky", "node1", ', "--fail-rate", "0.3"'),
    _pod("flaky-2", "flaky", "node1", ', "--fail-rate", "0.3"'),  # two, so a rare 7-in-a-row ejection leaves one
    _svc("sleepy", "10.96.0.14", "sleepy"), _pod("sleepy-1", "sleepy", "node2", ', "--latency-ms", "1000"'),
])

ROUTES = textwrap.dedent("""
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: hello-split, namespace: demo}
    spec:
      parentRefs: [{group: core, kind: Service, name: hello, port: 80}]
      rules:
        - backendRefs: [{name: hello, port: 80, weight: 80}, {name: hello-v2, port: 80, weight: 20}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: flaky-retry
      namespace: demo
      annotations: {retry.linkerd.io/http: 5xx, retry.linkerd.io/limit: "4"}
    spec:
      parentRefs: [{group: core, kind: Service, name: flaky, port: 80}]
      rules: [{backendRefs: [{name: flaky, port: 80}]}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: sleepy-timeout, namespace: demo}
    spec:
      parentRefs: [{group: core, kind: Service, name: sleepy, port: 80}]
      rules: [{backendRefs: [{name: sleepy, port: 80}], timeouts: {request: 200ms}}]
""")

# A keep-alive client in the client pod: N GETs, statuses, who answered, and each request's time.
CLIENT = textwrap.dedent("""
    import http.client, json, sys, time
    host, n = sys.argv[1], int(sys.argv[2])
    conn = http.client.HTTPConnection(host, 80, timeout=10)
    out = {"status": {}, "pod": {}, "ms": []}
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", "/")
        r = conn.getresponse(); body = r.read()
        out["ms"].append((time.perf_counter() - t) * 1000)
        out["status"][str(r.status)] = out["status"].get(str(r.status), 0) + 1
        try:
            p = json.loads(body)["pod"]
            out["pod"][p] = out["pod"].get(p, 0) + 1
        except ValueError:
            pass
        if r.will_close:
            conn.close(); conn = http.client.HTTPConnection(host, 80, timeout=10)
    print(json.dumps(out))
""")


def requests(vip: str, n: int) -> dict[str, Any]:
    proc = pod_exec("client", "python3", "-c", CLIENT, vip, str(n), timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def l7_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("l7")
    (d / "lab.yaml").write_text(LAB)
    (d / "routes.yaml").write_text(ROUTES)
    lab.down()
    lab.up(str(d / "lab.yaml"))
    try:
        out = cli("lab", "apply", "-f", str(d / "routes.yaml"))
        assert out.returncode == 0, out.stderr
        # the routes reached the agents: the split route starts sending to hello-v2
        eventually(lambda: "hello-v2-1" in requests("10.96.0.10", 30)["pod"], timeout=20, interval=0.5)
        yield d
    finally:
        lab.down()
        assert leftovers() == []


def test_traffic_split_80_20(l7_lab: Path) -> None:
    out = requests("10.96.0.10", 2000)
    assert out["status"] == {"200": 2000}
    v2 = out["pod"].get("hello-v2-1", 0) / 2000
    assert 0.15 <= v2 <= 0.25, out["pod"]


def test_retries_mask_30_percent_failures_within_budget(l7_lab: Path) -> None:
    before = metrics("node1")
    out = requests("10.96.0.13", 300)
    assert out["status"].get("200", 0) >= 297, out["status"]
    after = metrics("node1")
    labels = {"route": "demo/flaky-retry"}
    retries = total(after, "route_retry_total", labels) - total(before, "route_retry_total", labels)
    reqs = total(after, "route_request_total", labels) - total(before, "route_request_total", labels)
    assert reqs == 300 and 0 < retries <= 0.2 * reqs + 10 * 10, (retries, reqs)


def test_route_timeout_answers_504_in_200_to_300_ms(l7_lab: Path) -> None:
    out = requests("10.96.0.14", 5)
    assert out["status"] == {"504": 5}
    assert all(190 <= ms <= 300 for ms in out["ms"]), out["ms"]


def test_p2c_ewma_sends_under_20_percent_to_the_50ms_slower_endpoint(l7_lab: Path) -> None:
    out = requests("10.96.0.12", 300)
    assert out["status"] == {"200": 300}
    assert out["pod"].get("slow-1", 0) < 0.2 * 300, out["pod"]


def test_golden_metrics_show_what_was_sent(l7_lab: Path) -> None:
    before = metrics("node1")
    requests("10.96.0.11", 37)  # hello-v2 directly: no route, one endpoint
    after = metrics("node1")
    labels = {"direction": "outbound", "dst_service": "hello-v2", "authority": "hello-v2.demo.svc.cluster.local:80"}
    assert total(after, "request_total", labels) - total(before, "request_total", labels) == 37
    ok = {**labels, "classification": "success", "status_code": "200"}
    assert total(after, "response_total", ok) - total(before, "response_total", ok) == 37
    assert total(after, "response_latency_ms_count", labels) - total(before, "response_latency_ms_count", labels) == 37
    assert "# TYPE response_latency_ms histogram" in after
