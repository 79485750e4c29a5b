"""`nodemesh demo`: lab up, client -> hello through the node proxies, a readable report, lab down."""

from __future__ import annotations

import json
import sys

from nodemesh.lab import lab
from nodemesh.lab.topology import NodeAddressing
from nodemesh.nodeconfig import ADMIN_PORT
from nodemesh.scrape import total
from nodemesh.table import render


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(keep: bool = False, count: int = 40) -> int:
    _say("==> nodemesh lab up (2 nodes, the hello service with a pod on each, a client pod on node1)")
    state = lab.up()
    try:
        st = lab.status()
        hello = next(s for s in st["services"] if s["name"] == "hello")
        url = f"http://{hello['cluster_ip']}/"
        _say(f"==> {count} requests from demo/client to {url} (the hello VIP), 8 clients in parallel")
        proc = lab.exec_in("demo/client", ["nodemesh", "sample-client", url, "--count", str(count), "--concurrency", "8"], capture=True, timeout=120)
        if proc.returncode != 0:
            _say(f"client failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}")
            return 1
        summary = json.loads(proc.stdout)
        pods = {p["name"]: p for p in st["pods"]}
        _say("")
        _say(render(["BACKEND POD", "NODE", "RESPONSES"],
                    [[pod, pods.get(pod, {}).get("node", "?"), n] for pod, n in sorted(summary["by_pod"].items())]))
        lat = summary.get("latency_ms", {})
        _say(f"\n{summary['ok']} ok, {summary['errors']} errors; latency p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms")
        rows = []
        for name, entry in sorted(state.nodes.items()):
            node = NodeAddressing(name=name, index=int(entry["index"]))
            status, body = lab.http_get(node.underlay_ip, ADMIN_PORT, "/metrics")
            text = body.decode()
            rows.append([
                name,
                int(total(text, "tcp_open_total", {"direction": "outbound", "peer": "src"})),
                int(total(text, "request_total", {"direction": "outbound"})),
                int(total(text, "response_total", {"direction": "outbound", "classification": "success"})),
                int(total(text, "tcp_open_total", {"direction": "inbound", "peer": "src", "tls": "true"})),
                int(total(text, "tcp_read_bytes_total", {"direction": "inbound"})),
            ])
        _say("\nnode proxy counters (from each agent's /metrics on port 4191):")
        _say(render(["NODE", "OUTBOUND CONNS", "REQUESTS", "SUCCESSES", "INBOUND mTLS STREAMS", "INBOUND BYTES"], rows))
        _say("(cross-node requests share pooled mTLS tunnels; P2C over peak-EWMA latency favours the same-node pod)")
        answered_nodes = {pods.get(p, {}).get("node") for p in summary["by_pod"]}
        ok = summary["errors"] == 0 and len(answered_nodes) >= 2
        _say("\n" + ("both backends answered, one on each node, through the node proxies" if ok else "not every backend answered: see `nodemesh lab status`"))
        return 0 if ok else 1
    finally:
        if keep:
            _say("\n==> lab left running (`nodemesh lab status`, `nodemesh lab down`)")
        else:
            _say("\n==> nodemesh lab down")
            removed = lab.down()
            print(f"removed: {', '.join(removed)}", file=sys.stderr)
