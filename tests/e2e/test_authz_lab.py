"""Authorization policy end to end on the real lab: deny by default on the namespace, only the
`client` service account allowed; the same-node and the cross-node path in one matrix; removing the
allow cuts a live connection within a second; metrics and `nodemesh authz` tell the story."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab import lab
from nodemesh.lab.delete_objects import delete
from nodemesh.scrape import total

from .labtools import cli, eventually, leftovers, metrics, pod_exec, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

EXTRA_PODS = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: other, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: demo, labels: {app: intruder}}
spec: {nodeName: node1, serviceAccountName: other, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec: {nodeName: node1, containers: [{name: c, command: [sleep, infinity]}]}
"""

DENY_NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {nodemesh.io/mesh: enabled}
  annotations: {config.nodemesh.io/default-inbound-policy: deny}
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: Server
metadata: {name: hello-http, namespace: demo}
spec: {podSelector: {matchLabels: {app: hello}}, port: http, proxyProtocol: HTTP/1}
"""

ALLOW_CLIENT = """
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  targetRef: {group: policy.nodemesh.io, kind: Server, name: hello-http}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: client}]
"""

# Runs inside a pod: one GET, or (hold) one GET then wait on the open connection until it is cut.
PROBE = r"""
import json, socket, sys, time
ip, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.settimeout(5)
def out(**kw): print(json.dumps(kw), flush=True)
try:
    s.connect((ip, port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n")
    data = s.recv(4096)
except ConnectionResetError: out(result="reset"); sys.exit()
except ConnectionRefusedError: out(result="refused"); sys.exit()
except socket.timeout: out(result="timeout"); sys.exit()
if not data: out(result="eof"); sys.exit()
out(result="ok", status=data.split(b" ", 2)[1].decode(), pod=json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}").get("pod"), t=time.monotonic())
if mode == "hold":
    s.settimeout(15)
    try:
        rest = s.recv(4096)
        out(result="cut", how="eof" if not rest else "data", t=time.monotonic())
    except ConnectionResetError: out(result="cut", how="reset", t=time.monotonic())
    except socket.timeout: out(result="still-open", t=time.monotonic())
"""


def pod_ip(name: str) -> str:
    st = lab.status()
    return next(p["ip"] for p in st["pods"] if p["name"] == name)


def probe(src: str, ip: str, port: int = 8080) -> dict:
    proc = pod_exec(src, sys.executable, "-c", PROBE, ip, str(port), "once", timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def apply_text(tmp: Path, name: str, text: str) -> None:
    f = tmp / name
    f.write_text(text)
    lab.apply(str(f))


@pytest.fixture(scope="module")
def policy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("authz")
    lab.down()
    lab.up()
    try:
        apply_text(tmp, "pods.yaml", EXTRA_PODS)
        apply_text(tmp, "deny.yaml", DENY_NAMESPACE + "---\n" + ALLOW_CLIENT)
        (tmp / "allow.yaml").write_text(ALLOW_CLIENT)
        hello1 = pod_ip("hello-1")
        eventually(lambda: probe("intruder", hello1)["result"] == "reset", timeout=15)
        yield tmp
    finally:
        lab.down()
        assert leftovers() == []


MATRIX = [
    ("client", "hello-1", "same-node", "ok"),
    ("client", "hello-2", "cross-node", "ok"),
    ("intruder", "hello-1", "same-node", "reset"),  # meshed, but service account `other`
    ("intruder", "hello-2", "cross-node", "reset"),
    ("outsider", "hello-1", "same-node", "reset"),  # a pod of a non-meshed namespace: no identity
    ("outsider", "hello-2", "cross-node", "reset"),
]


@pytest.mark.parametrize("src, dst, path, expected", MATRIX, ids=[f"{s}->{d}({p})" for s, d, p, _ in MATRIX])
def test_matrix_same_node_and_cross_node_enforce_identically(policy_lab: Path, src: str, dst: str, path: str, expected: str) -> None:
    got = probe(src, pod_ip(dst))
    assert got["result"] == expected, got
    if expected == "ok":
        assert got["status"] == "200" and got["pod"] == dst


def test_client_through_the_service_vip(policy_lab: Path) -> None:
    got = probe("client", "10.96.0.10", 80)
    assert got["result"] == "ok" and got["status"] == "200"


def test_intruder_through_the_service_vip_is_refused(policy_lab: Path) -> None:
    # HTTP to the VIP goes through the L7 proxy, which picks an endpoint per request: hello-1 (same
    # node: node1 authorizes the request itself) or hello-2 (node2's tunnel server refuses the
    # intruder's stream). Either way a 403 from the proxy (or a reset), never the pod's answer.
    results = [probe("intruder", "10.96.0.10", 80) for _ in range(6)]  # both endpoints, per-request balancing
    assert all(r["result"] == "reset" or (r["result"] == "ok" and r["status"] == "403" and r["pod"] is None) for r in results), results
    assert any(r["result"] == "ok" and r["status"] == "403" for r in results), results


def test_metrics_count_allows_and_denies_with_labels(policy_lab: Path) -> None:
    probe("client", pod_ip("hello-2"))
    probe("intruder", pod_ip("hello-2"))
    text = metrics("node2")  # cross-node: node2's inbound decided
    allow = {"srv_kind": "Server", "srv_name": "hello-http", "authz_kind": "AuthorizationPolicy", "authz_name": "allow-client",
             "client_id": "spiffe://cluster.local/ns/demo/sa/client"}
    assert total(text, "inbound_tcp_authz_allow_total", allow) >= 1
    assert total(text, "inbound_tcp_authz_deny_total", {"srv_name": "hello-http", "client_id": "spiffe://cluster.local/ns/demo/sa/other"}) >= 1
    probe("intruder", pod_ip("hello-1"))
    text1 = metrics("node1")  # same-node: node1's outbound decided for hello-1
    assert total(text1, "inbound_tcp_authz_deny_total", {"srv_name": "hello-http", "target_addr": f"{pod_ip('hello-1')}:8080"}) >= 1


def test_nodemesh_authz_explains_the_denial(policy_lab: Path) -> None:
    r = cli("authz", "hello-1", "--from", "intruder", "--port", "8080")
    assert r.returncode == 1, r.stderr
    assert "default policy: deny (annotation on namespace demo)" in r.stdout
    assert "port 8080: DENY: denied: no AuthorizationPolicy on Server hello-http authorizes spiffe://cluster.local/ns/demo/sa/other" in r.stdout
    ok = cli("authz", "demo/hello-2", "--from", "client")
    assert ok.returncode == 0 and "ALLOW: allowed by AuthorizationPolicy allow-client on Server hello-http" in ok.stdout


@pytest.mark.parametrize("dst", ["hello-1", "hello-2"], ids=["same-node", "cross-node"])
def test_removing_the_allow_cuts_a_live_connection_within_a_second(policy_lab: Path, dst: str) -> None:
    ip = pod_ip(dst)
    eventually(lambda: probe("client", ip)["result"] == "ok", timeout=10)  # the allow is in force
    argv = [sys.executable, "-m", "nodemesh", "lab", "exec", "client", "--", sys.executable, "-c", PROBE, ip, "8080", "hold"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        first = json.loads(holder.stdout.readline())
        assert first["result"] == "ok", first
        delete(str(policy_lab / "allow.yaml"))
        removed = time.monotonic()
        cut = json.loads(holder.stdout.readline())
        assert cut["result"] == "cut", cut
        assert cut["t"] - removed < 1.0, f"cut {cut['t'] - removed:.3f} s after the policy was removed"
        print(f"{dst}: live connection cut {cut['t'] - removed:.3f} s after removal ({cut['how']})")
    finally:
        holder.kill()
        holder.wait()
        lab.apply(str(policy_lab / "allow.yaml"))  # restore for the next case
    node = "node1" if dst == "hello-1" else "node2"
    assert total(metrics(node), "inbound_tcp_authz_terminate_total", {"client_id": "spiffe://cluster.local/ns/demo/sa/client"}) >= 1


# ---- route-level policy: enforced by the destination pod's node, same-node and cross-node alike ----

# The intruder (service account `other`) may GET /allowed on the hello service, nothing else; no
# backendRefs: the parent service serves it. Applied for the route cases only (then deleted).
ROUTE_ALLOWED = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: allowed, namespace: demo}
spec:
  parentRefs: [{group: core, kind: Service, name: hello, port: 80}]
  rules: [{matches: [{path: {type: Exact, value: /allowed}, method: GET}]}]
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: other-on-allowed, namespace: demo}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: allowed}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: other}]
"""

# Runs inside a pod: GET each path on ONE keep-alive connection; statuses, pods and whether the
# connection stayed the same.
ROUTE_PROBE = r"""
import http.client, json, sys
ip, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
c = http.client.HTTPConnection(ip, port, timeout=5)
out, local = [], None
for p in paths:
    try:
        c.request("GET", p, headers={"Host": "hello"})
        r = c.getresponse()
        body = r.read()
    except (ConnectionError, OSError) as e:
        out.append({"path": p, "error": type(e).__name__}); break
    if local is None:
        local = c.sock.getsockname()
    pod = json.loads(body).get("pod") if body.startswith(b"{") else None
    out.append({"path": p, "status": r.status, "pod": pod, "error_header": r.getheader("l5d-proxy-error"),
                "same_connection": c.sock is not None and c.sock.getsockname() == local})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def route_policy(policy_lab: Path) -> Iterator[Path]:
    f = policy_lab / "route.yaml"
    f.write_text(ROUTE_ALLOWED)
    lab.apply(str(f))
    hello2 = pod_ip("hello-2")
    # in force on node2 once the intruder's /allowed gets through
    eventually(lambda: route_probe("intruder", hello2, 8080, "/allowed")[0].get("status") == 200, timeout=15)
    try:
        yield f
    finally:
        delete(str(f))


def route_probe(src: str, ip: str, port: int, *paths: str) -> list[dict]:
    proc = pod_exec(src, sys.executable, "-c", ROUTE_PROBE, ip, str(port), *paths, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


ROUTE_MATRIX = [
    ("intruder", "hello-1", "same-node", [200, 403, 200]),  # only the route policy lets it in
    ("intruder", "hello-2", "cross-node", [200, 403, 200]),
    ("outsider", "hello-1", "same-node", None),  # no identity: no policy could allow it: refused
    ("outsider", "hello-2", "cross-node", None),
]


@pytest.mark.parametrize("src, dst, path, expected", ROUTE_MATRIX, ids=[f"route:{s}->{d}({p})" for s, d, p, _ in ROUTE_MATRIX])
def test_route_matrix_same_node_and_cross_node_enforce_identically(route_policy: Path, src: str, dst: str, path: str, expected: list[int] | None) -> None:
    got = route_probe(src, pod_ip(dst), 8080, "/allowed", "/denied", "/allowed")
    if expected is None:
        assert "error" in got[0], got
        return
    assert [g.get("status") for g in got] == expected, got
    assert all(g["same_connection"] for g in got), got  # the 403 kept the connection usable
    assert got[0]["pod"] == dst and got[2]["pod"] == dst and got[1]["pod"] is None, got
    assert "no AuthorizationPolicy" in (got[1]["error_header"] or ""), got


def test_route_policy_through_the_service_vip(route_policy: Path) -> None:
    # Either endpoint: node1's L7 proxy decides for hello-1, node2's inbound for hello-2.
    for _ in range(4):
        got = route_probe("intruder", "10.96.0.10", 80, "/allowed", "/denied", "/allowed")
        assert [g.get("status") for g in got] == [200, 403, 200], got


def test_route_decisions_are_counted_by_the_destination_node(route_policy: Path) -> None:
    route_probe("intruder", pod_ip("hello-2"), 8080, "/allowed", "/denied")
    text = metrics("node2")
    other = "spiffe://cluster.local/ns/demo/sa/other"
    assert total(text, "inbound_http_authz_allow_total", {"route_name": "allowed", "authz_name": "other-on-allowed", "client_id": other, "tls": "true"}) >= 1
    assert total(text, "inbound_http_authz_deny_total", {"route_name": "default", "srv_name": "hello-http", "client_id": other, "tls": "true"}) >= 1
    assert total(text, "response_total", {"direction": "inbound", "tls": "true", "client_id": other, "status_code": "403"}) >= 1
