"""The lab's sample HTTP client: N GETs, then a JSON summary of who answered (pods, nodes) and how fast.

Keep-alive by default (one connection, reopened after an error); `new_connection_per_request`
opens one per request, which is what spreads load over endpoints when the mesh balances
per connection (opaque TCP).
"""

from __future__ import annotations

import http.client
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import click


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    i = min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))  # nearest rank
    return round(sorted_ms[i], 3)


@dataclass
class _Tally:
    ok: int = 0
    errors: int = 0
    by_pod: Counter[str] = field(default_factory=Counter)
    by_node: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""


def run(url: str, count: int, new_connection_per_request: bool = False, timeout: float = 5.0, concurrency: int = 1,
        duration: float | None = None) -> dict[str, Any]:
    """Send `count` GETs to `url` from `concurrency` parallel clients; return
    {ok, errors, by_pod, by_node, by_status, latency_ms: {p50, p99}, last_error}. With `duration`,
    stop after that many seconds if the count is not reached first (traffic that must span an event)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: only http://host[:port]/path URLs are supported")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname, parts.port or 80
    concurrency = max(1, min(concurrency, count))
    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        deadline = time.monotonic() + duration if duration else None
        tallies = list(pool.map(lambda n: _client(host, port, path, n, new_connection_per_request, timeout, deadline), shares))
    total = _Tally()
    for t in tallies:
        total.ok += t.ok
        total.errors += t.errors
        total.by_pod.update(t.by_pod)
        total.by_node.update(t.by_node)
        total.by_status.update(t.by_status)
        total.latencies += t.latencies
        total.last_error = t.last_error or total.last_error
    total.latencies.sort()
    return {
        "url": url,
        "ok": total.ok,
        "errors": total.errors,
        "by_pod": dict(sorted(total.by_pod.items())),
        "by_node": dict(sorted(total.by_node.items())),
        "by_status": dict(sorted(total.by_status.items())),
        "latency_ms": {"p50": _percentile(total.latencies, 0.50), "p99": _percentile(total.latencies, 0.99)},
        "last_error": total.last_error,
    }


def _client(host: str, port: int, path: str, count: int, new_connection_per_request: bool, timeout: float,
            deadline: float | None = None) -> _Tally:
    """One sequential client: `count` GETs over one keep-alive connection (or one each)."""
    ok = errors = 0
    by_pod: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    latencies: list[float] = []
    last_error = ""
    conn: http.client.HTTPConnection | None = None
    for _ in range(count):
        if deadline is not None and time.monotonic() > deadline:
            break
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        start = time.perf_counter()
        try:
            headers = {"connection": "close"} if new_connection_per_request else {}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            latencies.append((time.perf_counter() - start) * 1000)
            by_status[str(resp.status)] += 1
            try:
                doc = json.loads(body)
            except ValueError:
                doc = {}
            if isinstance(doc, dict) and "pod" in doc:  # /healthz and error pages say nothing about who
                by_pod[str(doc.get("pod", "?"))] += 1
                by_node[str(doc.get("node", "?"))] += 1
            if 200 <= resp.status < 300:
                ok += 1
            else:
                errors += 1
                last_error = f"HTTP {resp.status}"
            if new_connection_per_request or resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            errors += 1
            by_status["error"] += 1
            last_error = f"{type(exc).__name__}: {exc}"
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return _Tally(ok, errors, by_pod, by_node, by_status, latencies, last_error)


@click.command("sample-client")
@click.argument("url")
@click.option("-n", "--count", default=10, show_default=True, type=click.IntRange(min=1), help="Requests to send.")
@click.option("--new-connection", "--new-connection-per-request", "new_connection_per_request", is_flag=True, help="Open a new TCP connection for every request.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds per request.")
@click.option("-c", "--concurrency", default=1, show_default=True, type=click.IntRange(min=1, max=256), help="Parallel clients sharing the COUNT requests.")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds if COUNT is not reached first.")
def command(url: str, count: int, new_connection_per_request: bool, timeout: float, concurrency: int, duration: float | None) -> None:
    """Send COUNT GETs to URL and print a JSON summary; exits 1 if any request failed."""
    try:
        summary = run(url, count, new_connection_per_request, timeout, concurrency, duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    click.echo(json.dumps(summary, indent=2))
    if summary["errors"]:
        raise click.exceptions.Exit(1)


def main(argv: list[str] | None = None) -> int:
    try:
        rc = command.main(args=argv, prog_name="nodemesh sample-client", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return rc if isinstance(rc, int) else 0
