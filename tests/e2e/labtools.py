"""Helpers for end-to-end tests on the real lab (root, netns, cgroups, BPF)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nodemesh.lab import lab
from nodemesh.lab.topology import BPF_PIN_ROOT, CGROUP_ROOT_NAME, NODE_NETNS_PREFIX, POD_NETNS_PREFIX, UNDERLAY_BRIDGE, UNDERLAY_VETH_PREFIX, NodeAddressing
from nodemesh.nodeconfig import ADMIN_PORT

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="end-to-end lab tests need root")


def cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nodemesh", *args], capture_output=True, text=True, input=input, timeout=timeout)


def leftovers() -> list[str]:
    """Everything of ours that `lab down` must have removed."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    found += [f"netns {l.split()[0]}" for l in netns if l.startswith((NODE_NETNS_PREFIX, POD_NETNS_PREFIX))]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {name}" for name in (UNDERLAY_BRIDGE,) if f" {name}:" in links]
    found += [f"link {l.split(':')[1].strip()}" for l in links.splitlines() if l.split(":")[1].strip().startswith(UNDERLAY_VETH_PREFIX)]
    with open("/proc/mounts", encoding="utf-8") as f:
        cg2 = next(l.split()[1] for l in f if l.split()[2] == "cgroup2")
    if os.path.exists(os.path.join(cg2, CGROUP_ROOT_NAME)):
        found.append(f"cgroup {os.path.join(cg2, CGROUP_ROOT_NAME)}")
    if os.path.exists(BPF_PIN_ROOT):
        found.append(f"pinned {BPF_PIN_ROOT}")
    return found


@contextlib.contextmanager
def fresh_lab(**up_options: Any) -> Iterator[None]:
    """A lab brought up from nothing (`lab.up(**up_options)`), then down with nothing of it left."""
    lab.down()
    lab.up(**up_options)
    try:
        yield
    finally:
        lab.down()
        assert leftovers() == []


def add_pod_netns(netns_name: str, veth_host: str, veth_pod: str, host_ip: str, pod_ip: str) -> None:
    """A netns reached over a veth pair: `veth_pod` (pod_ip/24, up, with lo up) inside it and
    `veth_host` (host_ip/24, up) in the root netns."""
    from pyroute2 import IPRoute, NetNS, netns

    netns.create(netns_name)
    with IPRoute() as ipr:
        ipr.link("add", ifname=veth_host, kind="veth", peer={"ifname": veth_pod, "net_ns_fd": netns_name})
        idx = ipr.link_lookup(ifname=veth_host)[0]
        ipr.addr("add", index=idx, address=host_ip, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    with NetNS(netns_name) as ns:
        idx = ns.link_lookup(ifname=veth_pod)[0]
        ns.addr("add", index=idx, address=pod_ip, prefixlen=24)
        ns.link("set", index=idx, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def remove_pod_netns(netns_name: str, veth_host: str) -> None:
    """Undoes add_pod_netns; safe on a partial or absent one."""
    from pyroute2 import IPRoute, netns

    # Delete the host veth explicitly: removing the netns destroys it only asynchronously.
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=veth_host):
            ipr.link("del", index=idx)
    if netns_name in netns.listnetns():
        netns.remove(netns_name)


def pod_exec(pod: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return lab.exec_in(pod, list(argv), capture=True, timeout=timeout)


def client_summary(pod: str, url: str, count: int, new_connection: bool = True, concurrency: int = 1) -> dict[str, Any]:
    """Requests from a pod. P2C over peak-EWMA prefers the faster (same-node) endpoint, so tests that
    need both nodes to answer send with some concurrency (pending requests raise an endpoint's cost)."""
    args = ["nodemesh", "sample-client", url, "--count", str(count), "--concurrency", str(concurrency)] + (["--new-connection"] if new_connection else [])
    proc = pod_exec(pod, *args)
    assert proc.returncode == 0, (proc.stdout.decode()[-1500:], proc.stderr.decode())
    return json.loads(proc.stdout)


def metrics(node: str) -> str:
    state = lab.require_up()
    addr = NodeAddressing(name=node, index=int(state.nodes[node]["index"]))
    status, body = lab.http_get(addr.underlay_ip, ADMIN_PORT, "/metrics")
    assert status == 200
    return body.decode()


def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# ---- lab files for feature tests: two nodes, a meshed `demo` namespace, a client pod ----------


def pod_yaml(name: str, app: str, node: str, *, sa: str, command: str, port_name: str, args: str = "") -> str:
    """A demo pod running `nodemesh <command> --port 8080` (`args`: more JSON list items, e.g. ', "--fail-rate", "1"')."""
    return f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers:
    - name: {port_name if port_name != "http" else "web"}
      command: ["nodemesh", "{command}", "--port", "8080"{args}]
      ports: [{{containerPort: 8080, name: {port_name}}}]
"""


def service_yaml(name: str, ip: str, app: str, port_name: str) -> str:
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec: {{clusterIP: {ip}, selector: {{app: {app}}}, ports: [{{name: {port_name}, port: 80, targetPort: 8080}}]}}
"""


def two_node_lab(server_sa: str) -> str:
    """Nodes, the meshed namespace, the servers' and the client's service accounts, the client pod."""
    return f"""apiVersion: v1
kind: Node
metadata: {{name: node1}}
---
apiVersion: v1
kind: Node
metadata: {{name: node2}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{nodemesh.io/mesh: enabled}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {server_sa}, namespace: demo}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: demo}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: demo, labels: {{app: client}}}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{{name: client, command: ["sleep", "infinity"]}}]
"""
