"""An open-loop HTTP/1.1 load generator that measures latency without coordinated omission.

Closed-loop tools (wrk) send the next request only after the previous answer, so a stall delays
the requests that would have seen it and the stall vanishes from the percentiles. Here every
request has a scheduled send time fixed in advance (a constant rate spread over C keep-alive
connections, like wrk2); latency is counted from that scheduled time, not from when the request
actually left, so time a request spends waiting behind a slow one is measured. If the generator
itself falls behind, `send_lag_p99_us` says so.

Run inside a pod: `python -m nodemesh.bench.openloop URL --rate R --duration S` prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a project dependency
    uvloop = None  # type: ignore[assignment]

from nodemesh.bench.stats import percentile


def schedule(rate: float, duration_s: float, connections: int) -> list[list[float]]:
    """Send offsets (seconds from start) per connection: request i goes at i/rate on connection i % C."""
    if rate <= 0 or duration_s <= 0 or connections <= 0:
        raise ValueError(f"rate, duration and connections must be positive (got {rate}, {duration_s}, {connections})")
    total = int(rate * duration_s)
    plan: list[list[float]] = [[] for _ in range(connections)]
    for i in range(total):
        plan[i % connections].append(i / rate)
    return plan


@dataclass(frozen=True)
class OpenLoopResult:
    rate: float
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    p999_us: float | None
    max_us: float | None
    send_lag_p99_us: float | None  # how late requests left vs their schedule (generator health)


def summarize(rate: float, duration_s: float, latencies_us: Sequence[float], lags_us: Sequence[float], errors: int, wall_s: float) -> OpenLoopResult:
    def p(q: float, v: Sequence[float]) -> float | None:
        return round(percentile(v, q), 1) if v else None

    return OpenLoopResult(
        rate=rate, duration_s=duration_s, requests=len(latencies_us), errors=errors,
        rps=round(len(latencies_us) / wall_s, 1) if wall_s > 0 else 0.0,
        p50_us=p(0.5, latencies_us), p90_us=p(0.9, latencies_us), p99_us=p(0.99, latencies_us),
        p999_us=p(0.999, latencies_us), max_us=p(1.0, latencies_us), send_lag_p99_us=p(0.99, lags_us),
    )


class _Conn(asyncio.Protocol):
    """One keep-alive connection with a queue of due times: a request that is due while the
    previous one is still out waits here (and its wait counts in its latency)."""

    def __init__(self, raw: bytes, stats: "_Stats") -> None:
        self.raw, self.stats = raw, stats
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pending: deque[float] = deque()
        self.inflight: float | None = None  # due time of the request on the wire
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next()

    def enqueue(self, due: float) -> None:
        self.pending.append(due)
        if self.inflight is None and self.transport is not None:
            self._next()

    def _next(self) -> None:
        if self.pending and not self.dead and self.transport is not None:
            self.inflight = self.pending.popleft()
            self.stats.lags.append(max(0.0, time.perf_counter() - self.inflight) * 1e6)
            self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self.inflight is not None:
            if self.parser.get_status_code() >= 400:
                self.stats.errors += 1
            else:  # from the schedule, not from the send: no coordinated omission
                self.stats.latencies.append((time.perf_counter() - self.inflight) * 1e6)
            self.stats.completed += 1
            self.inflight = None
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        lost = len(self.pending) + (self.inflight is not None)
        self.stats.errors += lost
        self.stats.completed += lost
        self.pending.clear()
        self.inflight = None


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.errors = 0
        self.completed = 0


async def run(url: str, rate: float, duration_s: float, connections: int = 16, timeout: float = 5.0) -> OpenLoopResult:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: only http://host[:port]/path URLs are supported")
    host, port = parts.hostname, parts.port or 80
    raw = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    plan = schedule(rate, duration_s, connections)
    total = sum(len(p) for p in plan)
    loop = asyncio.get_running_loop()
    stats = _Stats()
    conns = [(await loop.create_connection(lambda: _Conn(raw, stats), host, port))[1] for _ in range(connections)]
    t0 = time.perf_counter() + 0.01
    for i in range(total):
        due = t0 + i / rate
        gap = due - time.perf_counter()
        # The loop's timers have 1 ms resolution: sleep to just before the due time, then yield
        # in a tight loop (the generator's core is its own) so requests leave on time.
        if gap > 0.002:
            await asyncio.sleep(gap - 0.0015)
        while time.perf_counter() < due:
            await asyncio.sleep(0)
        c = conns[i % connections]
        if c.dead:
            _, c = await loop.create_connection(lambda: _Conn(raw, stats), host, port)
            conns[i % connections] = c
        c.enqueue(due)
    deadline = time.perf_counter() + timeout
    while stats.completed < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.001)
    wall = time.perf_counter() - t0
    stats.errors += total - stats.completed  # still unanswered at the deadline
    for c in conns:
        if c.transport:
            c.transport.close()
    return summarize(rate, duration_s, stats.latencies, stats.lags, stats.errors, wall)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="openloop", description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, required=True, help="requests per second (constant)")
    ap.add_argument("--duration", type=float, required=True, help="seconds")
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args(argv)
    if uvloop is not None:
        uvloop.install()
    try:
        result = asyncio.run(run(args.url, args.rate, args.duration, args.connections))
    except ValueError as exc:
        print(f"openloop: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"openloop: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
