"""Identity and mTLS end to end on the real lab (issue 4): TLS on the underlay, short-lived
certificates rotating under traffic, issuer rotation, node-scoped CSRs, identity metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nodemesh import spiffe, tlsctx, wire
from nodemesh.agent.identity import make_csr, new_key
from nodemesh.lab import lab, lab_ca
from nodemesh.lab.topology import UNDERLAY_BRIDGE, UNDERLAY_GATEWAY
from nodemesh.nodeconfig import CONTROLLER_ADMIN_PORT, CONTROLLER_PORT, TUNNEL_PORT
from nodemesh.scrape import total

from .capture import Capture
from .labtools import cli, client_summary, eventually, fresh_lab, metrics, pod_exec, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

HELLO_URL = "http://10.96.0.10/"
LEAF_LIFETIME = 4.0  # seconds: several renewals during one test
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"


@pytest.fixture(scope="module")
def mtls_lab() -> Iterator[None]:
    with fresh_lab(leaf_lifetime=LEAF_LIFETIME):
        yield


def identities() -> dict[str, dict]:
    out = json.loads(cli("identity", "--json").stdout)
    return {n["node"]: n for n in out}


def controller_metrics() -> str:
    status, body = lab.http_get(UNDERLAY_GATEWAY, CONTROLLER_ADMIN_PORT, "/metrics")
    assert status == 200
    return body.decode()


def remote_hello_url() -> str:
    """hello-2 (on node2) by pod IP: traffic that must cross nodes."""
    pod = next(p for p in lab.status()["pods"] if p["name"] == "hello-2")
    return f"http://{pod['ip']}:8080/"


def background_client(count: int, new_connection: bool, duration: float | None = None) -> subprocess.Popen[bytes]:
    # by pod IP, not the VIP: the balancer may keep a short run of requests on the same-node endpoint
    url = remote_hello_url()
    args = [sys.executable, "-m", "nodemesh", "sample-client", url, "--count", str(count)] + (["--new-connection"] if new_connection else [])
    args += ["--duration", str(duration)] if duration else []
    return lab.spawn_in("client", args, log=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:]
    return json.loads(out)


def test_certificates_per_node_are_node_scoped(mtls_lab: None) -> None:
    ids = eventually(lambda: (i := identities()) and all(len(n.get("certificates", [])) >= 2 for n in i.values()) and i)
    held = {node: {c["identity"] for c in n["certificates"]} for node, n in ids.items()}
    assert CLIENT_ID in held["node1"] and CLIENT_ID not in held["node2"]  # the client pod runs on node1 only
    assert "spiffe://cluster.local/ns/demo/sa/hello" in held["node1"] & held["node2"]
    table = cli("identity")
    assert table.returncode == 0 and "NOT-AFTER" in table.stdout and CLIENT_ID in table.stdout
    # and in /metrics, for alerts before expiry: only where the certificate is held
    assert total(metrics("node1"), "identity_cert_expiration_timestamp_seconds", {"identity": CLIENT_ID}) > time.time()
    assert total(metrics("node2"), "identity_cert_expiration_timestamp_seconds", {"identity": CLIENT_ID}) == 0


def test_underlay_carries_tls_only_and_inbound_metrics_have_client_identity(mtls_lab: None) -> None:
    with Capture(UNDERLAY_BRIDGE) as cap:
        summary = client_summary("client", remote_hello_url(), 20)
        time.sleep(0.3)
    assert summary["errors"] == 0 and summary["by_node"].get("node2", 0) > 0
    wire_bytes = cap.stream_bytes(TUNNEL_PORT)
    assert b"\x17\x03\x03" in wire_bytes  # TLS application_data records on the tunnel port
    assert not cap.stream_bytes(4143), "cross-node bytes went to the plaintext inbound port"
    everything = b"".join(s.payload for s in cap.segments)
    # The request line, the JSON answer and the tunnel's CONNECT never appear in the clear.
    for plaintext in (b"GET / HTTP/1.1", b"hello-2", b"\"pod\"", b"CONNECT", b"10.244.2."):
        assert plaintext not in everything, plaintext
    text = metrics("node2")
    assert f'client_id="{CLIENT_ID}"' in text and 'direction="inbound"' in text and 'tls="true"' in text


def test_short_lived_certificates_rotate_under_traffic_with_zero_failures(mtls_lab: None) -> None:
    before = identities()
    gen_before = {c["identity"]: c["generation"] for c in before["node1"]["certificates"]}
    handshakes_before = before["node1"]["tunnel_connections"]
    long_lived = background_client(4000, new_connection=False)  # one keep-alive connection
    stream = background_client(1500, new_connection=True)  # a new connection per request
    time.sleep(3 * LEAF_LIFETIME)
    for summary in (finish(long_lived), finish(stream)):
        assert summary["errors"] == 0, summary["last_error"]
        assert summary["by_node"].get("node2", 0) > 0
    after = identities()
    gen_after = {c["identity"]: c["generation"] for c in after["node1"]["certificates"]}
    assert gen_after[CLIENT_ID] >= gen_before[CLIENT_ID] + 2  # renewed at least twice meanwhile
    # A renewed source certificate means a new TLS connection for the next new tunnel stream. HTTP
    # rides pooled upstream streams that may outlive renewals, so open an opaque (L4) connection:
    # each one is a new stream, dialed with the current certificate generation.
    probe = ("import socket; s = socket.create_connection(('10.244.2.2', 8080), timeout=5); "
             "s.sendall(bytes(range(1, 32))); s.settimeout(5); s.recv(100); s.close()")
    out = pod_exec("client", "python3", "-c", probe)
    assert out.returncode == 0, out.stderr
    eventually(lambda: identities()["node1"]["tunnel_connections"] > handshakes_before, timeout=5)


def test_issuer_rotation_with_traffic_flowing(mtls_lab: None) -> None:
    old_issuer = {c["issuer"] for n in identities().values() for c in n["certificates"]}
    long_lived = background_client(3000, new_connection=False)
    stream = background_client(1000, new_connection=True)
    time.sleep(1.0)
    out = cli("identity", "rotate-issuer")
    assert out.returncode == 0, out.stderr
    new_subject = out.stdout.strip().split(": ", 1)[1]
    for summary in (finish(long_lived), finish(stream)):
        assert summary["errors"] == 0, summary["last_error"]
    assert new_subject not in old_issuer
    eventually(lambda: all(c["issuer"] == new_subject for n in identities().values() for c in n["certificates"]), timeout=3 * LEAF_LIFETIME)
    assert "nodemesh_controller_issuer_rotations_total 1.0" in controller_metrics()
    assert client_summary("client", HELLO_URL, 10)["errors"] == 0


async def _csr_as(node: str, identity: str) -> dict:
    """Speaks for `node` with its real node credential (from its identity dir) and asks for
    `identity`, as a compromised or confused agent would."""
    with open(os.path.join(lab_ca.identity_dir(node), "node-credential.pem"), "rb") as f:
        pem = f.read()
    key_end = pem.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    with open(os.path.join(lab_ca.ca_dir(), "trust-anchor.pem"), encoding="ascii") as f:
        bundle = f.read()
    ctx = tlsctx.client_context(bundle, pem[key_end:], pem[:key_end])
    reader, writer = await asyncio.open_connection(UNDERLAY_GATEWAY, CONTROLLER_PORT, ssl=ctx)
    try:
        writer.write(wire.encode({"type": "hello", "node": node, "version": 0}))
        writer.write(wire.encode({"type": "csr", "id": 1, "csr": make_csr(new_key(), identity)}))
        await writer.drain()
        dec = wire.FrameDecoder()
        async with asyncio.timeout(10):
            while True:
                for msg in dec.feed(await reader.read(65536)):
                    if msg["type"] in ("cert", "csr_refused", "error"):
                        return msg
    finally:
        writer.close()


def test_csr_for_a_workload_on_another_node_is_refused(mtls_lab: None) -> None:
    ans = asyncio.run(_csr_as("node2", CLIENT_ID))  # the client pod runs on node1
    assert ans["type"] == "csr_refused" and ans["reason"] == "not_on_node", ans
    assert "node2" in ans["message"]
    assert 'nodemesh_controller_csr_refused_total{reason="not_on_node"}' in controller_metrics()
    ok = asyncio.run(_csr_as("node1", CLIENT_ID))  # the same request from the right node is signed
    assert ok["type"] == "cert" and ok["identity"] == CLIENT_ID
    assert str(spiffe.parse(ok["identity"])) == CLIENT_ID
