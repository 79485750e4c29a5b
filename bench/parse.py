"""Parsers for the load generators' outputs (wrk --latency, h2load, iperf3 -J). Pure: text in,
numbers out; a missing field is an error naming the tool, never a silent zero."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


class ParseError(ValueError):
    """A load generator printed something we cannot read (it crashed, or its format changed)."""


@dataclass(frozen=True)
class LoadResult:
    """One run of one load generator. Latencies in microseconds; None where the tool has none."""

    requests: int
    duration_s: float
    rps: float
    errors: int
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    mean_us: float | None = None
    throughput_gbps: float | None = None


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def duration_us(text: str) -> float:
    """'81.00us' / '1.23ms' / '2.00s' -> microseconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ParseError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def _need(pattern: str, text: str, tool: str, what: str) -> re.Match[str]:
    m = re.search(pattern, text, re.MULTILINE)
    if not m:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ParseError(f"{tool} output has no {what}; it printed: {tail!r}")
    return m


def wrk(text: str) -> LoadResult:
    """Reads `wrk --latency` output."""
    pct = {int(p): duration_us(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", text, re.MULTILINE)}
    if set(pct) != {50, 90, 99}:
        _need(r"^NEVER$", text, "wrk", "latency distribution (was --latency given?)")
    done = _need(r"^\s+(\d+) requests in ([0-9.]+\w+),", text, "wrk", "request count")
    rps = _need(r"^Requests/sec:\s+([0-9.]+)", text, "wrk", "Requests/sec")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    mean = re.search(r"^\s+Latency\s+(\S+)", text, re.MULTILINE)
    return LoadResult(
        requests=int(done.group(1)), duration_s=duration_us(done.group(2)) / 1e6, rps=float(rps.group(1)),
        errors=errors, p50_us=pct[50], p90_us=pct[90], p99_us=pct[99],
        mean_us=duration_us(mean.group(1)) if mean else None,
    )


def h2load(text: str) -> LoadResult:
    """Reads h2load's summary (it reports mean and spread of request time, no percentiles)."""
    fin = _need(r"^finished in ([0-9.]+\w+), ([0-9.]+) req/s", text, "h2load", "'finished in' line")
    req = _need(r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
                text, "h2load", "requests line")
    rt = _need(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text, "h2load", "time for request")
    total, done, ok, failed, errored, timeout = (int(x) for x in req.groups())
    return LoadResult(
        requests=ok, duration_s=duration_us(fin.group(1)) / 1e6, rps=float(fin.group(2)),
        errors=failed + errored + timeout + (total - done), mean_us=duration_us(rt.group(3)),
    )


def iperf3(text: str) -> LoadResult:
    """Reads `iperf3 -J` (client side): received throughput."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 printed no JSON ({exc}): {text[-300:]!r}") from None
    if "error" in doc:
        raise ParseError(f"iperf3 failed: {doc['error']}")
    try:
        recv = doc["end"]["sum_received"]
        return LoadResult(requests=0, duration_s=float(recv["seconds"]), rps=0.0, errors=0,
                          throughput_gbps=float(recv["bits_per_second"]) / 1e9)
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"iperf3 JSON has no end.sum_received ({exc})") from None
