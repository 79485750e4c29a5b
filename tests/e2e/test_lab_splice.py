"""Same-node L4 kernel splice on the real lab: a client pod streams to a pod on the same node by
its IP (opaque TCP, authorized, local plan); once relaying, the proxy hands both of its sockets to
the sk_skb verdict, so the bytes go socket to socket in the kernel: the BPF counters see them,
the proxy's user space does not, the data arrives intact (sha256), the close still reaches the far
side, tcp_*_bytes_total still count them, and a policy change still cuts a spliced connection."""

from __future__ import annotations

import os

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab import lab
from nodemesh.scrape import total

from .labtools import eventually, leftovers, metrics, pod_exec, requires_root
from .test_lab_bpf import set_shortcut

pytestmark = [pytest.mark.e2e, requires_root]

SINK_PORT = 9000

# The sink answers each connection with {"bytes": n, "sha256": hex} after the client's FIN.
SINK = f"""
import hashlib, json, socket, threading
srv = socket.create_server(("0.0.0.0", {SINK_PORT}), backlog=64)
def serve(c):
    h, n = hashlib.sha256(), 0
    try:
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            h.update(d); n += len(d)
        c.sendall(json.dumps({{"bytes": n, "sha256": h.hexdigest()}}).encode())
    except OSError:
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

SINK_POD = f"""
apiVersion: v1
kind: Pod
metadata: {{name: sink, namespace: demo, labels: {{app: sink}}}}
spec:
  nodeName: node1
  serviceAccountName: default
  containers: [{{name: c, command: [python3, -c, {json.dumps(SINK)}]}}]
"""

SEND = """
import hashlib, json, socket, sys, time
ip, port, mb, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
block = hashlib.sha256(b"nodemesh").digest() * 32768  # 1 MiB, deterministic
h = hashlib.sha256()
s = socket.create_connection((ip, port), timeout=30)
time.sleep(0.3)  # the proxy splices once relaying; stream after that, as a long-lived connection would
try:
    for i in range(mb):
        s.sendall(block); h.update(block)
        if pause:
            time.sleep(pause)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        reply += d
    print(json.dumps({"sent": mb << 20, "sha256": h.hexdigest(), "reply": json.loads(reply)}))
except (ConnectionResetError, BrokenPipeError) as exc:
    print(json.dumps({"reset": type(exc).__name__}))
"""


def splice_numbers() -> dict[str, float]:
    m = metrics("node1")
    return {
        "bpf_bytes": total(m, "nodemesh_bpf_splice_bytes_total"),
        "user_bytes": total(m, "nodemesh_splice_userspace_bytes_total"),
        "spliced": total(m, "nodemesh_splice_connections_total"),
        "skipped": total(m, "nodemesh_splice_skipped_total"),
        "read": total(m, "tcp_read_bytes_total", {"direction": "outbound", "peer": "src"}),
    }


@pytest.fixture(scope="module")
def splice_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    lab.down()
    os.environ["NODEMESH_LAB_SOCKMAP"] = "1"  # these tests switch the shortcut at run time
    os.environ["NODEMESH_LAB_SPLICE"] = "1"  # and need the splice (both off by default)
    try:
        lab.up()
    finally:
        os.environ.pop("NODEMESH_LAB_SOCKMAP", None)
        os.environ.pop("NODEMESH_LAB_SPLICE", None)
    try:
        f = tmp_path_factory.mktemp("splice") / "sink.yaml"
        f.write_text(SINK_POD)
        lab.apply(str(f))
        st = lab.status()
        sink_ip = next(p["ip"] for p in st["pods"] if p["name"] == "sink")
        eventually(lambda: send(sink_ip, 1).get("reply", {}).get("bytes") == 1 << 20, timeout=20)
        # Splice and the sk_msg shortcut are exclusive per connection (agent/splice.py): new
        # connections skip the shortcut from here on.
        set_shortcut("node1", False)
        yield {"sink_ip": sink_ip, **st}
    finally:
        lab.down()
        assert leftovers() == []


def send(ip: str, mb: int, pause: float = 0.0) -> dict:
    proc = pod_exec("client", "python3", "-c", SEND, ip, str(SINK_PORT), str(mb), str(pause), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def _stream_is_spliced(splice_lab: dict, mb: int) -> None:
    before = splice_numbers()
    result = send(splice_lab["sink_ip"], mb)
    assert result["reply"] == {"bytes": mb << 20, "sha256": result["sha256"]}  # intact, and the FIN arrived
    n = mb << 20

    def counted() -> bool:
        after = splice_numbers()
        assert after["spliced"] == before["spliced"] + 1
        assert after["read"] - before["read"] >= n  # spliced bytes folded into tcp_read_bytes_total at close
        return True

    eventually(counted, timeout=5)
    after = splice_numbers()
    assert after["bpf_bytes"] - before["bpf_bytes"] >= n * 0.95  # what was read before the splice is not in BPF
    assert after["user_bytes"] - before["user_bytes"] <= n * 0.01  # user space after the splice: ~0


def test_same_node_stream_is_spliced_in_the_kernel(splice_lab: dict) -> None:
    _stream_is_spliced(splice_lab, 16)


@pytest.mark.slow
def test_100mb_same_node_stream_is_spliced_in_the_kernel(splice_lab: dict) -> None:
    _stream_is_spliced(splice_lab, 100)


def test_connections_on_the_shortcut_are_relayed_not_spliced(splice_lab: dict) -> None:
    set_shortcut("node1", True)
    try:
        before = splice_numbers()
        result = send(splice_lab["sink_ip"], 4)
        assert result["reply"] == {"bytes": 4 << 20, "sha256": result["sha256"]}
        after = splice_numbers()
        assert (after["spliced"], after["skipped"]) == (before["spliced"], before["skipped"] + 1)
    finally:
        set_shortcut("node1", False)


def test_policy_change_cuts_a_spliced_connection(splice_lab: dict, tmp_path: Path) -> None:
    state, pod = lab.resolve_pod("client")
    sender = lab.spawn_in("client", [sys.executable, "-c", SEND, splice_lab["sink_ip"], str(SINK_PORT), "60", "0.1"], log=subprocess.PIPE)
    try:
        before = splice_numbers()["spliced"]
        eventually(lambda: splice_numbers()["spliced"] == before + 1, timeout=10)
        f = tmp_path / "deny.yaml"
        f.write_text("""
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {nodemesh.io/mesh: enabled}
  annotations: {config.nodemesh.io/default-inbound-policy: deny}
""")
        lab.apply(str(f))
        out, _ = sender.communicate(timeout=15)
        assert json.loads(out) == {"reset": "ConnectionResetError"} or "reset" in json.loads(out)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
