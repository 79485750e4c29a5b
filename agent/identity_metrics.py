"""The node's certificates in /metrics: when each workload certificate expires (Linkerd's
`identity_cert_expiration_timestamp_seconds`, labelled by identity since one proxy holds many),
how often it was renewed, and the CSRs and trust bundles the agent refused, so an alert can
fire before a certificate runs out rather than after traffic fails closed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class IdentityCollector:
    """A prometheus-client collector over an AgentIdentity (read at scrape time, never cached)."""

    def __init__(self, identity: Any) -> None:
        self.identity = identity

    def collect(self) -> Iterator[Metric]:
        ident = self.identity
        expires = GaugeMetricFamily("identity_cert_expiration_timestamp_seconds",
                                    "Time when this proxy's certificate for the identity expires (Unix seconds)", labels=["identity"])
        renewed = CounterMetricFamily("nodemesh_identity_cert_refresh",
                                      "Certificates received for the identity (the first one and each renewal)", labels=["identity"])
        for name, cred in sorted(ident.store.creds.items()):
            expires.add_metric([name], cred.not_after)
            renewed.add_metric([name], cred.generation)
        yield expires
        yield renewed
        yield CounterMetricFamily("nodemesh_identity_csr_refused", "CSRs the controller refused", value=ident.refusals)
        yield CounterMetricFamily("nodemesh_identity_bundle_refused",
                                  "Trust bundle pushes refused (not PEM CA certificates): the bundle in force stays",
                                  value=ident.bundle_refusals)
        yield GaugeMetricFamily("nodemesh_identity_trust_bundle_generation",
                                "Trust bundles adopted since start (1 = the bootstrap anchor)", value=ident.store.bundle_generation)
        yield GaugeMetricFamily("nodemesh_identity_pending_csrs", "CSRs sent and not answered yet", value=len(ident.store.pending))
