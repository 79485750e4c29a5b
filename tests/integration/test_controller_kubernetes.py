"""`nodemesh controller run --source kubernetes` as a process against the API test server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

from nodemesh import wire
from tests.kubeapi.objects import cluster
from tests.kubeapi.server import KubeApiServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubeconfig(tmp_path, server: KubeApiServer):  # type: ignore[no-untyped-def]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return kubeconfig


def _wait_ready(admin: int, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    deadline, ready = time.monotonic() + 20, False
    while time.monotonic() < deadline and not ready and proc.poll() is None:
        try:
            ready = urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1).status == 200
        except OSError:
            time.sleep(0.1)
    assert ready, "controller never became ready"


def test_controller_process_syncs_from_the_api_and_gets_ready(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with KubeApiServer() as server:
        for o in cluster():
            server.create(o)
        kubeconfig = _kubeconfig(tmp_path, server)
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps({"node1": "t1"}))
        admin, stream = _free_port(), _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodemesh", "controller", "run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
             "--tokens-file", str(tokens), "--listen", f"127.0.0.1:{stream}", "--admin", f"127.0.0.1:{admin}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            _wait_ready(admin, proc)
            watched = {p for m, p, q in server.requests if q.get("watch") == "true"}
            assert {"/api/v1/pods", "/api/v1/services", "/api/v1/namespaces", "/api/v1/nodes"} <= watched
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out


def test_controller_process_authenticates_agents_with_tokenreview(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The flags the rendered Deployment passes (no tokens file): an agent's projected token is
    checked with TokenReview, audience- and node-bound."""
    with KubeApiServer() as server:
        for o in cluster():
            server.create(o)
        server.add_service_account_token("sa-token-node1", "mesh-system", "agent", ["nodemesh-controller"], pod="a", node="node1")
        server.add_service_account_token("sa-token-wrong-aud", "mesh-system", "agent", ["kubernetes"], pod="a", node="node1")
        admin, stream = _free_port(), _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodemesh", "controller", "run", "--source", "kubernetes", "--kubeconfig", str(_kubeconfig(tmp_path, server)),
             "--agent-auth", "tokenreview", "--token-audience", "nodemesh-controller", "--agent-service-account", "mesh-system/agent",
             "--listen", f"127.0.0.1:{stream}", "--admin", f"127.0.0.1:{admin}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            _wait_ready(admin, proc)
            assert _hello(stream, "node1", "sa-token-node1")["type"] == "config"
            refused = _hello(stream, "node1", "sa-token-wrong-aud")
            assert refused["type"] == "error" and "audience" in refused["reason"], refused
            refused = _hello(stream, "node2", "sa-token-node1")
            assert refused["type"] == "error" and "claimed to be node 'node2'" in refused["reason"], refused
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "agents authenticated by tokenreview" in out


def _hello(port: int, node: str, token: str) -> dict:  # type: ignore[type-arg]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire.encode({"type": "hello", "node": node, "token": token, "version": 0}))
        dec = wire.FrameDecoder()
        while True:
            data = sock.recv(65536)
            assert data, "closed without an answer"
            msgs = dec.feed(data)
            if msgs:
                return msgs[0]
