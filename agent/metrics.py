"""The proxy's metrics: TcpStats counters (bumped in C by the relay) exported at scrape time.

A custom Collector in a private CollectorRegistry (no global registry: tests run several proxies in
one process). Names and labels follow Linkerd's proxy so its dashboards work:
tcp_open_total, tcp_open_connections, tcp_close_total, tcp_read_bytes_total, tcp_write_bytes_total
with direction, peer ("src" = the accepted side, "dst" = the upstream side), tls, dst_namespace,
dst_service. Label values come only from the config (namespaces, services), never from peers'
addresses or pod names, so cardinality is bounded by the config.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodemesh.fastpath import TcpStats

TCP_LABELS = ("direction", "peer", "tls", "dst_namespace", "dst_service")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Why a connection failed before or instead of being relayed: a closed set, so it is a safe label.
ERRORS = (
    "no_original_dst",  # the BPF lookup had no entry for the accepted socket
    "no_route",  # decide() rejected: unknown destination, no endpoints...
    "connect_failed",  # upstream refused / unreachable
    "connect_timeout",
    "tunnel_refused",  # the remote node's inbound answered non-200
    "handshake_error",  # malformed tunnel handshake (either direction)
    "unknown_pod",  # inbound: target is not a meshed pod on this node
)

_BPF_NAME = re.compile(r"[^a-zA-Z0-9_]")


class ProxyMetrics:
    """Owns the TcpStats per label set, the error counters and the private registry."""

    def __init__(self, bpf_counters: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._tcp: dict[tuple[str, str, str, str, str], TcpStats] = {}
        self._errors: Counter[tuple[str, str]] = Counter()
        self.bpf_counters = bpf_counters
        self.config_version = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def tcp(self, direction: str, peer: str, dst_namespace: str = "", dst_service: str = "", tls: bool = False) -> TcpStats:
        """The counters for one label set, created on first use and kept (counters never go back)."""
        key = (direction, peer, "true" if tls else "false", dst_namespace, dst_service)
        stats = self._tcp.get(key)
        if stats is None:
            stats = self._tcp[key] = TcpStats()
        return stats

    def error(self, direction: str, error: str) -> None:
        if error not in ERRORS:
            raise ValueError(f"unknown error label {error!r}; add it to metrics.ERRORS")
        self._errors[(direction, error)] += 1

    def errors(self, direction: str, error: str) -> int:
        return self._errors[(direction, error)]

    def tcp_series(self) -> Iterator[tuple[dict[str, str], TcpStats]]:
        for key, stats in list(self._tcp.items()):
            yield dict(zip(TCP_LABELS, key)), stats

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, m: ProxyMetrics) -> None:
        self._m = m

    def collect(self) -> Iterator[Metric]:
        m = self._m
        fams = {
            "open": CounterMetricFamily("tcp_open_total", "Total number of TCP connections opened", labels=TCP_LABELS),
            "conns": GaugeMetricFamily("tcp_open_connections", "Number of currently open TCP connections", labels=TCP_LABELS),
            "close": CounterMetricFamily("tcp_close_total", "Total number of TCP connections closed", labels=TCP_LABELS),
            "read": CounterMetricFamily("tcp_read_bytes_total", "Total bytes read from peers", labels=TCP_LABELS),
            "write": CounterMetricFamily("tcp_write_bytes_total", "Total bytes written to peers", labels=TCP_LABELS),
        }
        for key, s in list(m._tcp.items()):
            fams["open"].add_metric(key, s.open_total)
            fams["conns"].add_metric(key, s.open_connections)
            fams["close"].add_metric(key, s.close_total)
            fams["read"].add_metric(key, s.read_bytes)
            fams["write"].add_metric(key, s.write_bytes)
        yield from fams.values()

        errors = CounterMetricFamily(
            "nodemesh_tcp_errors_total", "Connections the proxy closed instead of relaying, by cause", labels=("direction", "error")
        )
        for (direction, error), n in sorted(m._errors.items()):
            errors.add_metric((direction, error), n)
        yield errors

        yield GaugeMetricFamily("nodemesh_config_version", "Version of the NodeConfig in use (0 = none yet)", value=m.config_version)

        if m.bpf_counters is not None:
            try:
                counters = m.bpf_counters()
            except Exception:  # maps closed during shutdown: a scrape must still answer
                counters = {}
            for name, value in sorted(counters.items()):
                base = _BPF_NAME.sub("_", name).removesuffix("_total")
                yield CounterMetricFamily(f"nodemesh_bpf_{base}_total", f"BPF redirect programs: {name}", value=value)
