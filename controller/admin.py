"""The controller's admin endpoints: /ready, /live and /metrics on a private Prometheus registry.

Metrics are read at scrape time from the counters the components already keep (a custom
Collector), so the stream server and the file source carry no Prometheus code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nodemesh.admin_http import Route, serve_admin

from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.stream_server import StreamServer


class ControllerCollector(Collector):
    def __init__(self, store: ConfigStore, server: StreamServer, state_errors: Callable[[], int]) -> None:
        self.store, self.server, self.state_errors = store, server, state_errors

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("nodemesh_controller_agents_connected", "Authenticated agent streams open now.",
                                value=self.server.agents_connected)
        pushes = CounterMetricFamily("nodemesh_controller_config_pushes", "Node configs sent to agents.", labels=["node"])
        for node, n in sorted(self.server.pushes.items()):
            pushes.add_metric([node], n)
        yield pushes
        yield CounterMetricFamily("nodemesh_controller_auth_failures", "Agent hellos rejected (unknown node, bad token, bad hello).",
                                  value=self.server.auth_failures)
        ident = self.server.identity
        if ident is not None:  # CA metrics (identity issue): what was signed, what was refused and why
            signed = CounterMetricFamily("nodemesh_controller_certificates_signed", "Certificates issued, by kind.", labels=["kind"])
            for kind, n in sorted(ident.signed.items()):
                signed.add_metric([kind], n)
            yield signed
            refused = CounterMetricFamily("nodemesh_controller_csr_refused", "CSRs refused, by reason.", labels=["reason"])
            for reason, n in sorted(ident.csr_refused.items()):
                refused.add_metric([reason], n)
            yield refused
            boot = CounterMetricFamily("nodemesh_controller_bootstrap_refused", "Node bootstraps refused, by reason.", labels=["reason"])
            for reason, n in sorted(ident.bootstrap_refused.items()):
                boot.add_metric([reason], n)
            yield boot
            yield CounterMetricFamily("nodemesh_controller_issuer_rotations", "Issuer rotations since start.", value=ident.ca.rotations)
            yield GaugeMetricFamily("nodemesh_controller_issuer_expiry_timestamp_seconds", "When the current issuer expires.",
                                    value=ident.ca.issuer.cert.not_valid_after_utc.timestamp())
        yield CounterMetricFamily("nodemesh_controller_state_errors", "Cluster-state files or objects rejected as invalid.",
                                  value=self.state_errors())
        yield GaugeMetricFamily("nodemesh_controller_revision", "Current config revision (0 until the first state).",
                                value=self.store.revision if self.store.ready else 0)
        yield GaugeMetricFamily("nodemesh_controller_ready", "1 once the first cluster state is loaded.",
                                value=1 if self.store.ready else 0)


def controller_registry(store: ConfigStore, server: StreamServer, state_errors: Callable[[], int]) -> CollectorRegistry:
    """A private registry (no global side effects, so tests can run many controllers)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ControllerCollector(store, server, state_errors))
    return registry


def admin_routes(store: ConfigStore, registry: CollectorRegistry) -> dict[str, Route]:
    text = "text/plain; charset=utf-8"

    def ready() -> tuple[int, str, bytes]:
        if store.ready:
            return 200, text, b"ready\n"
        return 503, text, b"not ready: no cluster state loaded yet\n"

    return {
        "/ready": ready,
        "/live": lambda: (200, text, b"live\n"),
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
    }


async def serve_controller_admin(host: str, port: int, store: ConfigStore, server: StreamServer,
                                 state_errors: Callable[[], int]) -> asyncio.AbstractServer:
    registry = controller_registry(store, server, state_errors)
    return await serve_admin(host, port, admin_routes(store, registry))
