"""`nodemesh authz` explains from a YAML file (the lab path is covered end to end)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nodemesh.cli import cli

from .test_authz import ALLOW_CLIENT

CLUSTER = """
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.244.1.0/24}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {nodemesh.io/mesh: enabled}, annotations: {config.nodemesh.io/default-inbound-policy: deny}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-1, namespace: demo, labels: {app: hello}}
spec: {nodeName: node1, serviceAccountName: hello, containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node1, serviceAccountName: client}
status: {podIP: 10.244.1.3}
"""


def invoke(tmp_path: Path, *args: str):
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER + ALLOW_CLIENT)
    return CliRunner().invoke(cli, ["authz", *args, "-f", str(f)])


def test_lists_servers_policies_and_default(tmp_path):
    r = invoke(tmp_path, "demo/hello-1")
    assert r.exit_code == 0, r.output
    assert "default policy: deny (annotation on namespace demo)" in r.output
    assert "hello-http  8080  HTTP/1    allow-client  Server  spiffe://cluster.local/ns/demo/sa/client" in r.output


def test_explains_a_denial_with_exit_1(tmp_path):
    r = invoke(tmp_path, "hello-1", "--from", "demo/other", "--port", "8080", "--port", "9000")
    assert r.exit_code == 1
    assert "port 8080: DENY: denied: no AuthorizationPolicy on Server hello-http authorizes spiffe://cluster.local/ns/demo/sa/other" in r.output
    assert "port 9000: DENY: denied by default policy deny (annotation on namespace demo)" in r.output


def test_explains_an_allow_from_a_pod(tmp_path):
    r = invoke(tmp_path, "hello-1", "--from", "client")
    assert r.exit_code == 0
    assert "port 8080: ALLOW: allowed by AuthorizationPolicy allow-client on Server hello-http" in r.output


def test_unknown_pod_and_client_are_named(tmp_path):
    r = invoke(tmp_path, "nope")
    assert r.exit_code == 4 and "pod 'nope' does not exist (pods: demo/client, demo/hello-1)" in r.output
    r = invoke(tmp_path, "hello-1", "--from", "whoever")
    assert r.exit_code == 4 and "--from 'whoever' is neither" in r.output
