"""Node bootstrap and CSR signing over the real mTLS config stream (loopback, ephemeral ports)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from nodemesh import spiffe, tlsctx, wire
from nodemesh.agent.identity_client import AgentIdentity, BootstrapError
from nodemesh.agent.stream_client import ConfigStream
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.identity_service import IdentityService
from nodemesh.controller.stream_server import StreamServer
from nodemesh.model import ClusterState, Container, Namespace, Node, Pod

TD = "cluster.local"
TOKENS = {"node1": "tok-1", "node2": "tok-2"}
FAST = dict(backoff_base=0.02, backoff_cap=0.1, auth_retry=0.2, ping_interval=0.2)
WEB = spiffe.workload_id(TD, "demo", "web")
DB = spiffe.workload_id(TD, "demo", "db")


def run(coro: Any, timeout: float = 10) -> Any:
    return uvloop.run(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def cluster() -> ClusterState:
    return ClusterState().apply([
        Node("node1", "192.168.0.1", "10.244.1.0/24"), Node("node2", "192.168.0.2", "10.244.2.0/24"),
        Namespace("demo", labels={"nodemesh.io/mesh": "enabled"}),
        Pod("demo", "web-1", "node1", "web", containers=(Container("c"),), pod_ip="10.244.1.2"),
        Pod("demo", "db-1", "node2", "db", containers=(Container("c"),), pod_ip="10.244.2.2"),
    ])


class Controller:
    def __init__(self, lifetime: float = 60) -> None:
        self.anchor = new_trust_anchor(TD)
        self.ca = CertificateAuthority(TD, [self.anchor.cert], new_issuer(self.anchor, TD), lifetime)
        self.store = ConfigStore(first_revision=1)
        self.store.update(cluster())
        self.identity = IdentityService(self.ca, self.store, TOKENS)
        self.server = StreamServer(self.store, TOKENS, ping_interval=0.2, identity=self.identity)

    async def start(self) -> None:
        await self.server.start("127.0.0.1", 0, ssl=self.identity.server_context())

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.port)


class Agent:
    def __init__(self, ctl: Controller, node: str = "node1", token: str | None = None) -> None:
        self.identity = AgentIdentity(node, TOKENS[node] if token is None else token, ctl.ca.bundle_pem(), TD)
        self.stream = ConfigStream(ctl.addr, node, "", self.identity.set_config, identity=self.identity, **FAST)
        self.task = asyncio.ensure_future(self.stream.run())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@contextlib.asynccontextmanager
async def controller(lifetime: float = 60) -> AsyncIterator[Controller]:
    ctl = Controller(lifetime)
    await ctl.start()
    try:
        yield ctl
    finally:
        await ctl.server.close()


@contextlib.asynccontextmanager
async def agent_of(ctl: Controller) -> AsyncIterator[Agent]:
    a = Agent(ctl)
    try:
        yield a
    finally:
        await a.stop()


def test_bootstrap_then_mtls_stream_and_workload_certs():
    async def main():
        async with controller() as ctl, agent_of(ctl) as a:
            await until(lambda: a.identity.credential(WEB) is not None)
            assert a.stream.connected and a.stream.version > 0
            assert a.identity.credential(a.identity.node_identity) is not None
            assert ctl.identity.signed["node"] == 1 and ctl.identity.signed["workload"] == 1
            assert ctl.server.connected["node1"] == 1
            # the leaf chains to the anchor and names exactly the workload
            leaf = a.identity.credential(WEB).leaf
            assert str(spiffe.cert_identity(leaf, TD)) == WEB
            assert DB not in a.identity.store.creds  # node1 never asks for node2's workload
    run(main())


def test_short_lived_certs_renew_at_70_percent_over_the_stream():
    async def main():
        async with controller(lifetime=2) as ctl, agent_of(ctl) as a:
            await until(lambda: a.identity.credential(WEB) is not None)
            first = a.identity.credential(WEB).leaf.serial_number
            await until(lambda: a.identity.store.creds[WEB].generation >= 3, timeout=8)
            assert a.identity.credential(WEB).leaf.serial_number != first
            assert a.stream.connected  # renewals ride the live stream, no reconnect needed
    run(main(), timeout=15)


def test_csr_for_another_nodes_workload_is_refused_and_counted():
    async def main():
        async with controller() as ctl, agent_of(ctl) as a:
            await until(lambda: a.identity.credential(WEB) is not None)
            a.identity.workloads = frozenset({WEB, DB})  # a compromised/confused agent asks for db (on node2)
            a.identity._wake.set()
            await until(lambda: DB in a.identity.store.refused)
            assert a.identity.store.refused[DB] == "not_on_node"
            assert a.identity.credential(DB) is None
            assert ctl.identity.csr_refused["not_on_node"] >= 1
            assert a.stream.connected  # a refusal does not cost the stream
    run(main())


@pytest.mark.parametrize("case,match,counter", [
    ("bad_token", "bad bootstrap token", "bad_token"),
    ("reused_token", "already used", "reused_token"),
])
def test_bootstrap_refusals(case, match, counter):
    async def main():
        async with controller() as ctl:
            if case == "reused_token":
                first = AgentIdentity("node1", TOKENS["node1"], ctl.ca.bundle_pem(), TD)
                await first.bootstrap(ctl.addr)
                token = TOKENS["node1"]
            else:
                token = "wrong"
            again = AgentIdentity("node1", token, ctl.ca.bundle_pem(), TD)
            with pytest.raises(BootstrapError, match=match):
                await again.bootstrap(ctl.addr)
            assert ctl.identity.bootstrap_refused[counter] == 1
            assert not again.has_node_cert()
    run(main())


async def _raw_hello(ctl: Controller, ctx: ssl.SSLContext, hello: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(*ctl.addr, ssl=ctx)
    try:
        writer.write(wire.encode(hello))
        await writer.drain()
        dec = wire.FrameDecoder()
        while True:
            data = await reader.read(65536)
            assert data, "closed without an answer"
            msgs = dec.feed(data)
            if msgs:
                return msgs[0]
    finally:
        writer.close()


def test_hello_without_node_certificate_is_refused_even_with_the_token():
    async def main():
        async with controller() as ctl:
            ctx = tlsctx.client_context(ctl.ca.bundle_pem())
            msg = await _raw_hello(ctl, ctx, {"type": "hello", "node": "node1", "token": TOKENS["node1"], "version": 0})
            assert msg["type"] == "error" and "no node certificate" in msg["reason"]
            assert ctl.server.auth_failures == 1
    run(main())


def test_node_certificate_cannot_speak_for_another_node():
    async def main():
        async with controller() as ctl:
            n2 = AgentIdentity("node2", TOKENS["node2"], ctl.ca.bundle_pem(), TD)
            await n2.bootstrap(ctl.addr)
            msg = await _raw_hello(ctl, n2.stream_ssl(), {"type": "hello", "node": "node1", "version": 0})
            assert msg["type"] == "error" and "for node 'node2', not 'node1'" in msg["reason"]
    run(main())


def test_agent_refuses_a_server_that_is_not_the_controller():
    """A TLS server with a valid mesh chain but a workload identity is not our controller."""
    async def main():
        ctl = Controller()
        key_owner = AgentIdentity("node1", "x", ctl.ca.bundle_pem(), TD)
        key_owner.store.request(WEB)  # just for a fresh P-256 key
        key = key_owner.store.pending[WEB].key
        from cryptography.hazmat.primitives import serialization
        chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in ctl.ca.sign(key.public_key(), WEB))
        impostor_ctx = tlsctx.server_context(ctl.ca.bundle_pem(), chain.encode(),
                                             key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                                             require_client_cert=False)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=impostor_ctx)
        try:
            a = AgentIdentity("node1", TOKENS["node1"], ctl.ca.bundle_pem(), TD)
            from nodemesh.errors import ProtocolError
            with pytest.raises(ProtocolError, match="not the controller"):
                await a.bootstrap(("127.0.0.1", server.sockets[0].getsockname()[1]))
        finally:
            server.close()
    run(main())


def test_issuer_rotation_reissues_the_controller_cert_and_new_leaves_use_new_issuer():
    async def main():
        async with controller(lifetime=2) as ctl, agent_of(ctl) as a:
            await until(lambda: a.identity.credential(WEB) is not None)
            old_issuer = a.identity.credential(WEB).chain[1]
            new = new_issuer(ctl.anchor, TD)
            ctl.identity.rotate_issuer(new)
            await until(lambda: a.identity.credential(WEB) is not None and a.identity.credential(WEB).chain[1] == new.cert, timeout=8)
            assert old_issuer != new.cert
            # a fresh mTLS connection to the controller verifies its re-issued certificate
            msg = await _raw_hello(ctl, a.identity.stream_ssl(), {"type": "hello", "node": "node1", "version": 0})
            assert msg["type"] in ("bundle", "config", "ping")  # authenticated: the stream begins
    run(main(), timeout=15)


def test_certificates_expiry_and_renewals_are_exposed_as_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from nodemesh.agent.identity_metrics import IdentityCollector
    from nodemesh.scrape import total

    async def main():
        ctl = Controller(lifetime=2)  # renewed at 70%: a second chain within ~1.4 s
        await ctl.start()
        a = Agent(ctl)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(IdentityCollector(a.identity))
        try:
            await until(lambda: (c := a.identity.credential(WEB)) is not None and c.generation >= 2)
            text = generate_latest(registry).decode()
            cred = a.identity.store.creds[WEB]
            series = {"identity": WEB}
            assert total(text, "identity_cert_expiration_timestamp_seconds", series) == pytest.approx(cred.not_after)
            assert total(text, "nodemesh_identity_cert_refresh_total", series) == cred.generation
            assert total(text, "identity_cert_expiration_timestamp_seconds", {"identity": a.identity.node_identity}) > 0
            assert total(text, "nodemesh_identity_trust_bundle_generation", {}) == 1
            assert total(text, "nodemesh_identity_csr_refused_total", {}) == 0
        finally:
            await a.stop()
            await ctl.server.close()
    run(main())
