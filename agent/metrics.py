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

# client_id (inbound) / server_id (outbound): the peer's verified SPIFFE ID on mTLS connections, as
# Linkerd labels them; bounded by the identities in the config.
TCP_LABELS = ("direction", "peer", "tls", "dst_namespace", "dst_service", "client_id", "server_id")
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
    "unauthorized",  # authorization policy refused the client (agent/authorizer.py)
    "plaintext_refused",  # inbound: plaintext from off the mesh to a pod in strict inbound mode
    "no_certificate",  # outbound: no certificate for the source identity in time (fail closed)
    "tls_handshake",  # a TLS handshake with another node's proxy failed
    "tls_identity",  # the peer's verified certificate is not the identity expected (or not a mesh identity)
    "tunnel_error",  # the HTTP/2 tunnel broke (protocol error, reset)
)

_BPF_NAME = re.compile(r"[^a-zA-Z0-9_]")


class ProxyMetrics:
    """Owns the TcpStats per label set, the error counters and the private registry."""

    def __init__(self, bpf_counters: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._tcp: dict[tuple[str, ...], TcpStats] = {}
        self._errors: Counter[tuple[str, str]] = Counter()
        self.bpf_counters = bpf_counters
        self.config_version = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def tcp(self, direction: str, peer: str, dst_namespace: str = "", dst_service: str = "", tls: bool = False,
            client_id: str = "", server_id: str = "") -> TcpStats:
        """The counters for one label set, created on first use and kept (counters never go back)."""
        key = (direction, peer, "true" if tls else "false", dst_namespace, dst_service, client_id, server_id)
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
            "open": CounterMetricFamily("tcp_open_total", "Total number of TCP connections opened"),
            "conns": GaugeMetricFamily("tcp_open_connections", "Number of currently open TCP connections"),
            "close": CounterMetricFamily("tcp_close_total", "Total number of TCP connections closed"),
            "read": CounterMetricFamily("tcp_read_bytes_total", "Total bytes read from peers"),
            "write": CounterMetricFamily("tcp_write_bytes_total", "Total bytes written to peers"),
        }
        names = {"open": "tcp_open_total", "conns": "tcp_open_connections", "close": "tcp_close_total",
                 "read": "tcp_read_bytes_total", "write": "tcp_write_bytes_total"}
        for key, s in list(m._tcp.items()):
            # client_id / server_id appear only where known (mTLS), as in Linkerd's output
            labels = {k: v for k, v in zip(TCP_LABELS, key) if v or k not in ("client_id", "server_id")}
            values = {"open": s.open_total, "conns": s.open_connections, "close": s.close_total, "read": s.read_bytes, "write": s.write_bytes}
            for f, v in values.items():
                fams[f].add_sample(names[f], labels, v)
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
