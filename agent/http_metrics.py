"""HTTP golden metrics with Linkerd's names: HttpStats (Cython) per label set, exported at scrape
time by a Collector registered on the proxy's private registry (no observe() per request).

request_total, response_total (classification, status_code, and grpc_status_code on gRPC responses), response_latency_ms per
(direction, authority, dst_namespace, dst_service, tls, and client_id on inbound); route_request_total, route_response_total,
route_response_latency_ms and route_retry_total per (direction, route, dst_namespace, dst_service).
Label values come from the config (services, routes), never from request data.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

from nodemesh.fastpath import HttpStats

LABELS = ("direction", "authority", "dst_namespace", "dst_service", "tls")
OPTIONAL = ("client_id",)  # after LABELS in a series key; "" = the label is left out (outbound)
ROUTE_LABELS = ("direction", "route", "dst_namespace", "dst_service")


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_dst: dict[tuple[str, ...], HttpStats] = {}
        self._by_route: dict[tuple[str, ...], HttpStats] = {}
        registry.register(_Collector(self))

    def dst(self, direction: str, authority: str, dst_namespace: str, dst_service: str, tls: bool = False, client_id: str = "") -> HttpStats:
        key = (direction, authority, dst_namespace, dst_service, "true" if tls else "false", client_id)
        s = self._by_dst.get(key)
        if s is None:
            s = self._by_dst[key] = HttpStats()
        return s

    def route(self, direction: str, route: str, dst_namespace: str, dst_service: str) -> HttpStats:
        key = (direction, route, dst_namespace, dst_service)
        s = self._by_route.get(key)
        if s is None:
            s = self._by_route[key] = HttpStats()
        return s


def _families(prefix: str, labels: tuple[str, ...], series: dict[tuple[str, ...], HttpStats]) -> Iterator[Metric]:
    # Optional labels go last (a family's add_metric zips names with the values given, so a series
    # without them just passes fewer values).
    opt = OPTIONAL if prefix == "" else ()
    req = CounterMetricFamily(f"{prefix}request_total", "Total number of HTTP requests the proxy received", labels=labels + opt)
    resp = CounterMetricFamily(f"{prefix}response_total", "Total number of HTTP responses", labels=labels + ("classification", "status_code") + opt)
    lat = HistogramMetricFamily(f"{prefix}response_latency_ms", "Elapsed time between a request's first byte and its response's head", labels=labels + opt)
    retry = CounterMetricFamily(f"{prefix}retry_total", "Retries sent within the retry budget", labels=labels + opt)
    for full, s in list(series.items()):
        key, extra = full[:len(labels)], tuple(v for v in full[len(labels):] if v)
        req.add_metric(key + extra, s.requests)
        retry.add_metric(key + extra, s.retries)
        for status, failure, n in s.responses():
            resp.add_metric(key + ("failure" if failure else "success", str(status) if status else "") + extra, n)
        for code, failure, n in s.grpc_responses():  # gRPC series carry one more label (as Linkerd's do)
            resp.samples.append(Sample(f"{prefix}response_total", {**dict(zip(labels, key)), **dict(zip(opt, extra)), "classification": "failure" if failure else "success",
                                                                    "status_code": "200", "grpc_status_code": str(code)}, n))
        lat.add_metric(list(key + extra), s.latency.cumulative(), s.latency.sum)
    yield from (req, resp, lat, retry)


class _Collector:
    def __init__(self, m: HttpMetrics) -> None:
        self._m = m

    def collect(self) -> Iterator[Metric]:
        yield from _families("", LABELS, self._m._by_dst)
        yield from _families("route_", ROUTE_LABELS, self._m._by_route)
