"""Bench note for the L7 issue: HTTP/1.1 keep-alive through the node proxy vs one haproxy HTTP hop,
side by side in one run on loopback, plus the Cython vs pure-Python speedup of each hot unit.

    .venv/bin/python -m bench.l7_http1_keepalive [--seconds 5] [--rounds 3]

Paths (wrk on core 0, every server-side process on core 1; nginx `return 200` is the backend):
  direct    wrk → nginx
  haproxy   wrk → haproxy (mode http, pooled upstream) → nginx
  nodemesh  wrk → NodeProxy outbound (detection → HTTP/1 L7: route, P2C, pool) → nginx
The node proxy runs in its own process with the BPF original-destination lookup replaced by a
constant (every accepted peer "dialed" the service VIP). Added latency = path p50/p99 − direct's.
Rounds are interleaved and medians reported: the VM is noisy, only ratios in one run mean much.

`--compare-with FILE` adds a path `nodemesh_before`: the same node proxy with the HttpProxy class of
another copy of agent/http_proxy.py (e.g. the version before a change), for before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import timeit
from typing import Any

from bench.configs import RESPONSE_BODY, _global, _nginx
from bench.parse import wrk as parse_wrk
from bench.loopback_peers import loopback_peers

HOST = "127.0.9.1"
NGINX_PORT, HAPROXY_PORT, PROXY_PORT = 18480, 17480, 14140
VIP = "10.96.9.10"


def nginx_conf(prefix: str) -> str:
    return _nginx(prefix, f"""        listen {HOST}:{NGINX_PORT} backlog=4096;
        location / {{ default_type text/plain; return 200 "{RESPONSE_BODY}"; }}""")


def haproxy_conf(prefix: str) -> str:
    return _global(prefix) + f"""
frontend http_in
    mode http
    bind {HOST}:{HAPROXY_PORT}
    default_backend http_out
backend http_out
    mode http
    server s {HOST}:{NGINX_PORT}
"""


PROXY_MAIN = f"""
import asyncio, dataclasses, importlib.util, sys, uvloop
from nodemesh.agent.proxy import NodeProxy
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView
async def main():
    p = NodeProxy("node1", original_dst=lambda ip, port: ({VIP!r}, 80))
    if len(sys.argv) > 2:  # another http_proxy.py's HttpProxy (before/after comparisons)
        spec = importlib.util.spec_from_file_location("nodemesh.agent._http_proxy_alt", sys.argv[2])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        p.l7 = mod.HttpProxy(p.metrics, 5.0)
        p._ctx = dataclasses.replace(p._ctx, l7=p.l7)
    ep = Endpoint("bench", "nginx-1", {HOST!r}, {NGINX_PORT}, "node1", "spiffe://cluster.local/ns/bench/sa/nginx")
    p.apply_config(NodeConfig(1, "node1", nodes=(NodeInfo("node1", "127.0.0.1", "127.0.9.0/24"),),
        services=(ServiceView("bench", "nginx", {VIP!r}, (ServicePortView(80, "http", "TCP", (ep,)),)),)))
    await p.start(({HOST!r}, int(sys.argv[1])), ({HOST!r}, 0))
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def run_wrk(port: int, seconds: float, conns: int) -> dict[str, Any]:
    argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{int(seconds)}s", "--latency", f"http://{HOST}:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    r = parse_wrk(out.stdout)
    return {"rps": r.rps, "p50_us": r.p50_us, "p99_us": r.p99_us, "errors": r.errors}


def http_bench(seconds: float, rounds: int, compare_with: str | None = None) -> dict[str, Any]:
    for tool in ("wrk", "haproxy", "nginx", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs the bench tools)")
    paths = {"direct": NGINX_PORT, "haproxy": HAPROXY_PORT, "nodemesh": PROXY_PORT}
    proxies = [[PROXY_MAIN, str(PROXY_PORT)]]
    if compare_with is not None:
        proxies.append([PROXY_MAIN, str(PROXY_PORT + 1), compare_with])
        paths["nodemesh_before"] = PROXY_PORT + 1
    with loopback_peers("nm-l7-bench-", nginx_conf, haproxy_conf, proxies, HOST, paths.values()):
        samples: dict[str, dict[int, list[dict[str, Any]]]] = {k: {1: [], 50: []} for k in paths}
        for path, port in paths.items():  # warm-up (pool, EWMA, caches)
            run_wrk(port, 1, 10)
        for _ in range(rounds):
            for conns in (1, 50):
                for path, port in paths.items():
                    samples[path][conns].append(run_wrk(port, seconds, conns))
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    out: dict[str, Any] = {}
    for path in samples:
        out[path] = {
            "c1_p50_us": med(samples[path][1], "p50_us"), "c1_p99_us": med(samples[path][1], "p99_us"),
            "c50_rps": med(samples[path][50], "rps"), "c50_p50_us": med(samples[path][50], "p50_us"), "c50_p99_us": med(samples[path][50], "p99_us"),
            "errors": sum(x["errors"] for c in (1, 50) for x in samples[path][c]),
        }
    for path in [p for p in paths if p != "direct"]:
        out[path]["added_c1_p50_us"] = out[path]["c1_p50_us"] - out["direct"]["c1_p50_us"]
        out[path]["added_c1_p99_us"] = out[path]["c1_p99_us"] - out["direct"]["c1_p99_us"]
    out["nodemesh_vs_haproxy_c50_rps"] = out["nodemesh"]["c50_rps"] / out["haproxy"]["c50_rps"]
    if "nodemesh_before" in out:
        out["nodemesh_before_vs_haproxy_c50_rps"] = out["nodemesh_before"]["c50_rps"] / out["haproxy"]["c50_rps"]
        out["nodemesh_after_vs_before_c50_rps"] = out["nodemesh"]["c50_rps"] / out["nodemesh_before"]["c50_rps"]
    return out


def unit_speedups() -> dict[str, float]:
    """Python-reference time / Cython time for each hot unit, same inputs."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nodemesh import fastpath as fast
    from tests import fastpath_reference as ref

    req = b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: web.demo\r\nUser-Agent: bench\r\n\r\n"
    headers = [(b"Host", b"web.demo"), (b"User-Agent", b"bench"), (b"Accept", b"*/*"), (b"Connection", b"keep-alive"), (b"X-Request-Id", b"abc")]

    def bench(fn_fast: Any, fn_ref: Any, n: int = 20000) -> float:
        t_fast = min(timeit.repeat(fn_fast, number=n, repeat=5))
        t_ref = min(timeit.repeat(fn_ref, number=n, repeat=5))
        return round(t_ref / t_fast, 1)

    def ewma_round(mod: Any) -> Any:
        eps = [mod.PeakEwma(30.0, 10.0, 0.0) for _ in range(8)]

        def f() -> None:
            a, b = eps[1], eps[5]
            e = a if a.cost(1.0) <= b.cost(1.0) else b
            e.start()
            e.finish(1.5, 1.0)

        return f

    h_fast, h_ref = fast.LatencyHistogram(), ref.LatencyHistogram()
    return {
        "detect": bench(lambda: fast.detect(req), lambda: ref.detect(req)),
        "http1_encode_request_head": bench(lambda: fast.encode_request_head(b"GET", b"/x", headers, None, False),
                                           lambda: ref.encode_request_head(b"GET", b"/x", headers, None, False)),
        "balance_peak_ewma_p2c": bench(ewma_round(fast), ewma_round(ref)),
        "histogram_observe": bench(lambda: h_fast.observe(37.5), lambda: h_ref.observe(37.5)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--units-only", action="store_true")
    ap.add_argument("--compare-with", metavar="FILE", help="another agent/http_proxy.py to bench beside this one")
    args = ap.parse_args()
    result: dict[str, Any] = {"unit_speedup_x": unit_speedups()}
    if not args.units_only:
        result["http1_keepalive"] = http_bench(args.seconds, args.rounds, args.compare_with)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
