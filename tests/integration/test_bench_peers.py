"""The bench's peer configs are accepted by the real nginx and haproxy (config check mode), with
real certificates from the bench's throwaway CA; the open-loop generator against a real socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from cryptography import x509

from nodemesh.bench import configs, openloop
from nodemesh.bench.tls import make_mesh_pki

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/setup.sh installs it)")
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (scripts/setup.sh installs it)")


def _check(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pki_chains_to_its_ca(tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, server = make_mesh_pki(str(tmp_path))
    ca = x509.load_pem_x509_certificate(open(client.ca, "rb").read())
    for files in (client, server):
        cert = x509.load_pem_x509_certificate(open(files.cert, "rb").read())
        cert.verify_directly_issued_by(ca)
        assert b"PRIVATE KEY" in open(files.cert, "rb").read()  # haproxy wants cert + key in one PEM


@needs_haproxy
def test_haproxy_configs_pass_haproxy_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, server = make_mesh_pki(str(tmp_path / "pki"))
    for name, text in (("hop", configs.haproxy_hop(str(tmp_path), "10.244.1.2")),
                       ("client", configs.haproxy_sidecar_client(str(tmp_path), "10.244.1.3", client, "haproxy")),
                       ("server", configs.haproxy_sidecar_server(str(tmp_path), server, "haproxy"))):
        path = tmp_path / f"{name}.cfg"
        path.write_text(text)
        _check(["haproxy", "-c", "-q", "-f", str(path)])


@needs_nginx
def test_nginx_configs_pass_nginx_test(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name, text in (("server", configs.nginx_server(str(tmp_path))), ("hop", configs.nginx_hop(str(tmp_path), "10.244.1.2"))):
        os.makedirs(tmp_path / "tmp", exist_ok=True)
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        _check(["nginx", "-t", "-q", "-c", str(path), "-p", str(tmp_path)])


def test_iptables_rules_exempt_the_sidecar_and_cover_every_port() -> None:
    rules = configs.sidecar_client_iptables("10.244.1.3", "haproxy")
    assert [r[r.index("--dport") + 1] for r in rules] == ["8080", "8081", "5201"]
    assert all(["!", "--uid-owner", "haproxy"] == r[r.index("!"):r.index("!") + 3] for r in rules)
    assert all("PREROUTING" in r for r in configs.sidecar_server_iptables())


async def _stalling_server(stall_on: int, stall_s: float) -> tuple[asyncio.AbstractServer, int]:
    """HTTP/1.1 keep-alive server on loopback; request number `stall_on` is answered late."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                count += 1
                if count == stall_on:
                    await asyncio.sleep(stall_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_open_loop_counts_the_wait_behind_a_stall() -> None:
    """50 requests at 50/s on one connection; the 5th is answered 300 ms late. Measured from the
    schedule, the ~14 requests due during the stall are slow too (p90 > 50 ms); a closed-loop
    measurement from the send time would show one slow request and a p90 under a millisecond."""

    async def scenario() -> openloop.OpenLoopResult:
        server, port = await _stalling_server(stall_on=5, stall_s=0.3)
        async with server:
            return await openloop.run(f"http://127.0.0.1:{port}/", rate=50, duration_s=1.0, connections=1)

    result = asyncio.run(scenario())
    assert result.requests == 50 and result.errors == 0
    assert result.p90_us is not None and result.p90_us > 50_000
    assert result.max_us is not None and result.max_us >= 250_000


def test_open_loop_fails_fast_when_nothing_listens() -> None:
    with pytest.raises(OSError):
        asyncio.run(openloop.run("http://127.0.0.1:1/", rate=10, duration_s=0.2, connections=1))


def test_open_loop_rejects_non_http_urls() -> None:
    with pytest.raises(ValueError, match="only http://"):
        asyncio.run(openloop.run("https://example.invalid/", rate=1, duration_s=1))
