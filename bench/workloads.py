"""Workloads: how to drive one target with one load generator, and how to read its output.

Every generator runs pinned to LOADGEN_CPU inside the client pod; proxies and servers are
pinned to PROXY_CPU (the runner does that), so they do not compete for one core.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from nodemesh.bench import parse

LOADGEN_CPU, PROXY_CPU = 0, 1


@dataclass(frozen=True)
class Workload:
    name: str
    protocol: str  # which Scenario target it uses: http | h2c | bulk
    description: str
    argv: Callable[[str, int, int], list[str]]  # (host, port, seconds) -> command
    parse: Callable[[str], parse.LoadResult]


def _pinned(*argv: str) -> list[str]:
    return ["taskset", "-c", str(LOADGEN_CPU), *argv]


def _openloop_result(text: str) -> parse.LoadResult:
    import json

    try:
        d = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise parse.ParseError(f"openloop printed no JSON result ({exc}): {text[-300:]!r}") from None
    return parse.LoadResult(requests=d["requests"], duration_s=d["duration_s"], rps=d["rps"], errors=d["errors"],
                            p50_us=d["p50_us"], p90_us=d["p90_us"], p99_us=d["p99_us"])


def http_keepalive(connections: int = 50) -> Workload:
    return Workload(
        "http-keepalive", "http", f"HTTP/1.1 keep-alive, closed loop (wrk, {connections} connections)",
        lambda h, p, s: _pinned("wrk", "-t1", f"-c{connections}", f"-d{s}s", "--latency", f"http://{h}:{p}/"),
        parse.wrk,
    )


def open_loop(rate: int) -> Workload:
    return Workload(
        f"open-loop-{rate}", "http", f"HTTP/1.1 at a fixed {rate} req/s, latency from the schedule (no coordinated omission)",
        lambda h, p, s: _pinned(sys.executable, "-m", "nodemesh.bench.openloop", f"http://{h}:{p}/",
                                "--rate", str(rate), "--duration", str(s), "--connections", "8"),
        _openloop_result,
    )


def new_connection() -> Workload:
    return Workload(
        "http-new-conn", "http", "a new TCP connection per request (wrk, Connection: close, 4 connections)",
        lambda h, p, s: _pinned("wrk", "-t1", "-c4", f"-d{s}s", "--latency", "-H", "Connection: close", f"http://{h}:{p}/"),
        parse.wrk,
    )


def h2() -> Workload:
    return Workload(
        "h2", "h2c", "HTTP/2 cleartext, 4 connections x 10 streams (h2load)",
        lambda h, p, s: _pinned("h2load", "-c4", "-m10", "-D", str(s), f"http://{h}:{p}/"),
        parse.h2load,
    )


def bulk() -> Workload:
    return Workload(
        "bulk-tcp", "bulk", "bulk TCP throughput, one stream (iperf3)",
        lambda h, p, s: _pinned("iperf3", "-c", h, "-p", str(p), "-t", str(s), "-J"),
        parse.iperf3,
    )


def standard(open_loop_rates: tuple[int, ...]) -> list[Workload]:
    return [http_keepalive(), *(open_loop(r) for r in open_loop_rates), new_connection(), h2(), bulk()]
