"""Bench note for HTTP/2 / gRPC through the node proxy: h2load (prior knowledge) requests/s and
latency, side by side in one run on loopback.

    .venv/bin/python -m bench.h2_grpc [--requests 20000] [--rounds 3]

Paths (h2load on core 0, every server-side process on core 1):
  direct    h2load → nginx (h2c, `return 200`)
  haproxy   h2load → haproxy (h2 in, h2 out, pooled) → nginx
  nodemesh  h2load → NodeProxy outbound (h2 preface detected → agent/h2_proxy.py: route, P2C,
            multiplexed upstream h2) → nginx
Two request shapes: `plain` (GET, the response body nginx returns) and `grpc` (POST of a 5-byte
gRPC message with content-type application/grpc and te: trailers). The node proxy runs in its own
process with the BPF original-destination lookup replaced by a constant. Rounds are interleaved and
medians reported: the VM is noisy, only ratios in one run mean much. Also reports the Cython vs
pure-Python speedup of route matching (`--route-only` for just that).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
from typing import Any

from bench.configs import RESPONSE_BODY, _global, _nginx
from bench.loopback_peers import loopback_peers

HOST = "127.0.9.2"
NGINX_PORT, HAPROXY_PORT, PROXY_PORT = 18482, 17482, 14142
VIP = "10.96.9.20"

PROXY_MAIN = f"""
import asyncio, sys, uvloop
from nodemesh.agent.proxy import NodeProxy
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView
async def main():
    p = NodeProxy("node1", original_dst=lambda ip, port: ({VIP!r}, 80))
    ep = Endpoint("bench", "nginx-1", {HOST!r}, {NGINX_PORT}, "node1", "spiffe://cluster.local/ns/bench/sa/nginx")
    p.apply_config(NodeConfig(1, "node1", nodes=(NodeInfo("node1", "127.0.0.1", "127.0.9.0/24"),),
        services=(ServiceView("bench", "nginx", {VIP!r}, (ServicePortView(80, "grpc", "TCP", (ep,)),)),)))
    await p.start(({HOST!r}, int(sys.argv[1])), ({HOST!r}, 0))
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def nginx_conf(prefix: str) -> str:
    return _nginx(prefix, f"""        listen {HOST}:{NGINX_PORT} http2 backlog=4096;
        location / {{ default_type text/plain; return 200 "{RESPONSE_BODY}"; }}""")


def haproxy_conf(prefix: str) -> str:
    return _global(prefix) + f"""
frontend h2_in
    mode http
    bind {HOST}:{HAPROXY_PORT} proto h2
    default_backend h2_out
backend h2_out
    mode http
    server s {HOST}:{NGINX_PORT} proto h2
"""


_RPS = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_REQ_TIME = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")
_DONE = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")


def _us(v: str, unit: str) -> float:
    return float(v) * {"us": 1.0, "ms": 1000.0, "s": 1e6}[unit]


def parse_h2load(out: str) -> dict[str, Any]:
    rps = _RPS.search(out)
    t = _REQ_TIME.search(out)
    done = _DONE.search(out)
    if rps is None or t is None or done is None:
        raise RuntimeError(f"cannot parse h2load output:\n{out}")
    return {"rps": float(rps.group(1)), "mean_us": _us(t.group(5), t.group(6)), "max_us": _us(t.group(3), t.group(4)),
            "succeeded": int(done.group(2)), "failed": int(done.group(3)) + int(done.group(4))}


def run_h2load(port: int, requests: int, shape: str, datafile: str) -> dict[str, Any]:
    argv = ["taskset", "-c", "0", "h2load", "-n", str(requests), "-c", "4", "-m", "16", "-t", "1"]
    if shape == "grpc":
        argv += ["-d", datafile, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv.append(f"http://{HOST}:{port}/bench.Svc/Call")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return parse_h2load(out.stdout)


def bench(requests: int, rounds: int) -> dict[str, Any]:
    for tool in ("h2load", "haproxy", "nginx", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs the bench tools)")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    paths = {"direct": NGINX_PORT, "haproxy": HAPROXY_PORT, "nodemesh": PROXY_PORT}
    with loopback_peers("nm-h2-bench-", nginx_conf, haproxy_conf, [[PROXY_MAIN, str(PROXY_PORT)]], HOST, paths.values()) as d:
        datafile = f"{d}/msg.bin"
        with open(datafile, "wb") as f:
            f.write(b"\x00\x00\x00\x00\x05hello")
        for shape in ("plain", "grpc"):
            run_h2load(PROXY_PORT, 500, shape, datafile)  # warm-up (pools, detection)
            for _ in range(rounds):
                for path, port in paths.items():
                    results.setdefault(shape, {}).setdefault(path, []).append(run_h2load(port, requests, shape, datafile))
    summary: dict[str, Any] = {}
    for shape, by_path in results.items():
        for path, runs in by_path.items():
            summary.setdefault(shape, {})[path] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "mean_us": statistics.median(r["mean_us"] for r in runs),
                "failed": sum(r["failed"] for r in runs),
            }
        direct = summary[shape]["direct"]["rps"]
        for path in summary[shape]:
            summary[shape][path]["vs_direct"] = round(summary[shape][path]["rps"] / direct, 3)
    return summary


def route_speedup() -> dict[str, float]:
    """Python-reference time / Cython time of RouteTable matching (agent/routes.py vs
    fastpath/route.pyx), same table and requests: a service with 20 prefix/header/method rules
    and a catch-all, and the requests that land on the first, a middle and the last rule."""
    import timeit

    from nodemesh.agent.routes import compile_routes

    rules = [{"route": f"demo/r{i}", "matches": [{"path": {"type": "PathPrefix", "value": f"/svc{i}"}, "method": "POST",
                                                  "headers": [{"name": "x-tenant", "value": f"t{i}"}]}], "backends": []} for i in range(20)]
    rules.append({"route": "demo/all", "matches": [{}], "backends": []})
    table = compile_routes([{"parent": ["demo", "web", 80], "rules": rules}])
    out = {}
    for name, path, hdrs in (("first_rule", "/svc0/Call", {b"x-tenant": b"t0"}), ("middle_rule", "/svc10/Call", {b"x-tenant": b"t10"}),
                             ("catch_all", "/other", {b"x-tenant": b"t99"})):
        fast = min(timeit.repeat(lambda: table.match("demo", "web", 80, b"POST", path, hdrs), number=20000, repeat=5))
        ref = min(timeit.repeat(lambda: table.match_reference("demo", "web", 80, b"POST", path, hdrs), number=20000, repeat=5))
        out[name] = round(ref / fast, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--route-only", action="store_true", help="only the route-matching speedup (no servers)")
    args = ap.parse_args()
    out: dict[str, Any] = {"route_match_speedup": route_speedup()}
    if not args.route_only:
        out.update(bench(args.requests, args.rounds))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
