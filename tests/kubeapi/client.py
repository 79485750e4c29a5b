"""The real `kubernetes` client pointed at the API test server."""

from __future__ import annotations

from kubernetes import client

from tests.kubeapi.server import KubeApiServer


def api_client(server: KubeApiServer, token: str | None = "test-token") -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = server.url
    if token is not None:
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
    cfg.retries = False  # urllib3 retries would hide the faults under test
    return client.ApiClient(cfg)
