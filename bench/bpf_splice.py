"""Same-node TCP: kernel-spliced vs proxied in user space vs direct pod to pod, same run, on the
running lab (issue 7's bench note; sibling of bench/bpf_shortcut.py).

    NODEMESH_LAB_INSTANCE=k nodemesh lab up
    NODEMESH_LAB_INSTANCE=k python -m bench.bpf_splice [--rounds 3] [--mb 256] [--pings 2000]

Adds two echo/sink pods on node1: `bench-sink` in the meshed namespace demo and `bench-plain` in
an unmeshed namespace. The sockmap shortcut is off during the run (its connections are never
spliced). From the client pod (node1):
  spliced  - to bench-sink's IP with splice on (pinned nm_settings[1] = 1),
  proxied  - the same with splice off (nm_settings[1] = 0): relayed by the proxy's user space,
  direct   - to bench-plain's IP: not meshed, no proxy at all.
Each round measures a one-way stream of `mb` MiB (MiB/s) and `pings` 64-byte request/response
round trips on one connection (p50 µs), and node1's agent CPU per MiB, rounds interleaved so drift hits every variant. Prints
medians and ratios as JSON. Ratios only: never assert them (EBPF-NOTES.md: noisy VM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

from bench.procstat import cpu_ns
from bench.stats import median, ratio
from nodemesh.lab import lab
from nodemesh.lab.topology import BPF_PIN_ROOT

PORT = 9100
SERVER = f"""
import socket, threading
srv = socket.create_server(("0.0.0.0", {PORT}), backlog=64)
def serve(c):
    mode = c.recv(1)
    n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        if mode == b"E":
            c.sendall(d)
        n += len(d)
    if mode == b"S":
        c.sendall(str(n).encode())
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = """
import json, socket, sys, time
ip, port, mb, pings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((ip, port)); s.sendall(b"S"); time.sleep(0.3)  # let the proxy splice
block = bytes(1 << 20)
t = time.perf_counter()
for _ in range(mb):
    s.sendall(block)
s.shutdown(socket.SHUT_WR)
got = int(s.recv(64)); elapsed = time.perf_counter() - t
assert got == mb << 20, got
e = socket.create_connection((ip, port)); e.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
e.sendall(b"E"); time.sleep(0.3)
msg, rtts = bytes(64), []
for _ in range(pings):
    t0 = time.perf_counter(); e.sendall(msg); n = 0
    while n < 64:
        n += len(e.recv(64 - n))
    rtts.append(time.perf_counter() - t0)
rtts.sort()
print(json.dumps({"mib_per_s": mb / elapsed, "p50_us": rtts[len(rtts) // 2] * 1e6}))
"""

PODS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: bench-plain}}
---
apiVersion: v1
kind: Pod
metadata: {{name: bench-sink, namespace: demo, labels: {{app: bench-sink}}}}
spec: {{nodeName: node1, containers: [{{name: c, command: [python3, -c, {json.dumps(SERVER)}]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: bench-plain, namespace: bench-plain}}
spec: {{nodeName: node1, containers: [{{name: c, command: [python3, -c, {json.dumps(SERVER)}]}}]}}
"""


def set_setting(node: str, index: int, on: bool) -> None:
    """nm_settings[index] (0 = sockmap shortcut, 1 = splice) through the pinned map."""
    path = os.path.join(BPF_PIN_ROOT, node, "maps", "nm_settings")
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", str(index), "0", "0", "0",
                    "value", "1" if on else "0", "0", "0", "0"], check=True, capture_output=True)


def set_splice(node: str, on: bool) -> None:
    set_setting(node, 1, on)


def one(ip: str, mb: int, pings: int, agent_pid: int | None = None) -> dict[str, float]:
    cpu0 = cpu_ns([agent_pid]) if agent_pid else 0
    proc = lab.exec_in("demo/client", ["python3", "-c", CLIENT, ip, str(PORT), str(mb), str(pings)], capture=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench client failed: {proc.stderr.decode()[-800:]}")
    out = json.loads(proc.stdout)
    if agent_pid:  # node1's proxy CPU per MiB moved (stream + pings)
        out["proxy_cpu_ms_per_mib"] = (cpu_ns([agent_pid]) - cpu0) / 1e6 / mb
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--pings", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(PODS)
        f.flush()
        lab.apply(f.name)
    ips = {p["name"]: p["ip"] for p in lab.status()["pods"]}
    deadline = time.monotonic() + 30
    while True:  # the pods' servers start asynchronously
        try:
            one(ips["bench-sink"], 1, 10), one(ips["bench-plain"], 1, 10)
            break
        except SystemExit:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    results: dict[str, list[dict[str, float]]] = {"spliced": [], "proxied": [], "direct": []}
    agent_pid = int(lab.require_up().processes["agent/node1"]["pid"])
    set_setting("node1", 0, False)  # the shortcut's connections are never spliced (agent/splice.py)
    try:
        for _ in range(args.rounds):
            for variant in results:
                set_splice("node1", variant != "proxied")
                ip = ips["bench-plain" if variant == "direct" else "bench-sink"]
                results[variant].append(one(ip, args.mb, args.pings, agent_pid))
    finally:
        set_splice("node1", True)
        set_setting("node1", 0, True)
    out: dict[str, object] = {v: {k: median([r[k] for r in rs]) for k in ("mib_per_s", "p50_us", "proxy_cpu_ms_per_mib")} for v, rs in results.items()}
    med = {v: out[v] for v in results}  # type: ignore[misc]
    out["throughput_spliced_over_proxied"] = ratio(med["spliced"]["mib_per_s"], med["proxied"]["mib_per_s"])
    out["throughput_spliced_over_direct"] = ratio(med["spliced"]["mib_per_s"], med["direct"]["mib_per_s"])
    out["throughput_proxied_over_direct"] = ratio(med["proxied"]["mib_per_s"], med["direct"]["mib_per_s"])
    out["p50_spliced_over_proxied"] = ratio(med["spliced"]["p50_us"], med["proxied"]["p50_us"])
    out["p50_spliced_over_direct"] = ratio(med["spliced"]["p50_us"], med["direct"]["p50_us"])
    out["p50_proxied_over_direct"] = ratio(med["proxied"]["p50_us"], med["direct"]["p50_us"])
    out["proxy_cpu_spliced_over_proxied"] = ratio(med["spliced"]["proxy_cpu_ms_per_mib"], med["proxied"]["proxy_cpu_ms_per_mib"])
    out["config"] = vars(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
