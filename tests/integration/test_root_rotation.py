"""Trust anchor (root) rotation end to end on loopback: the real controller (IdentityService +
mTLS StreamServer) signs and pushes bundles to two agents over their config streams, while two
real NodeProxy instances carry traffic through mTLS tunnels across the three steps:

  1. add the new root (bundle old+new)   -> pushed to every agent and to the controller's listener
  2. issuer under the new root            -> leaves (2 s lifetime) are re-issued as they renew
  3. drop the old root (bundle new only)  -> old-root certificates are refused by new handshakes

with zero failed requests on new connections and on one long-lived connection.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from nodemesh import tlsctx, wire
from nodemesh.agent.identity_client import AgentIdentity
from nodemesh.agent.stream_client import ConfigStream
from nodemesh.agent.tunnel import sni_name
from nodemesh.controller.ca import CertificateAuthority, KeyPair, new_issuer, new_trust_anchor, to_pem
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.identity_service import IdentityService
from nodemesh.controller.stream_server import StreamServer
from nodemesh.model import ClusterState, Container, Namespace, Node, Pod

from .test_mtls_tunnel import CLIENT_ID, CLIENT_IP, ECHO2_IP, ECHO_ID, TD, Mesh, mesh, run

pytestmark = pytest.mark.timeout(60)
LIFETIME = 2.0
TOKENS = {"node1": "unused", "node2": "unused"}  # mesh() makes the agents with this token
FAST = dict(backoff_base=0.02, backoff_cap=0.1, auth_retry=0.2, ping_interval=0.5)


async def until(cond: Any, timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def cluster() -> ClusterState:
    return ClusterState().apply([
        Node("node1", "127.0.0.1", "127.0.1.0/24"), Node("node2", "127.0.0.2", "127.0.2.0/24"),
        Namespace("default", labels={"nodemesh.io/mesh": "enabled"}),
        Pod("default", "client-1", "node1", "client", containers=(Container("c"),), pod_ip=CLIENT_IP),
        Pod("default", "echo-2", "node2", "echo", containers=(Container("c"),), pod_ip=ECHO2_IP),
    ])


class Controller:
    def __init__(self, ca: CertificateAuthority) -> None:
        store = ConfigStore(first_revision=1)
        store.update(cluster())
        self.identity = IdentityService(ca, store, TOKENS)
        self.server = StreamServer(store, TOKENS, ping_interval=0.5, identity=self.identity)

    async def start(self) -> tuple[str, int]:
        await self.server.start("127.0.0.1", 0, ssl=self.identity.server_context())
        return ("127.0.0.1", self.server.port)


async def traffic(m: Mesh, stop: asyncio.Event, failures: list[str]) -> int:
    """New connections and one long-lived connection, back to back; returns requests done."""
    r, w = await m.connect()
    done = 0
    while not stop.is_set():
        done += 1
        try:
            assert await asyncio.wait_for(m.echo(b"n%d" % done), 3) == b"n%d<eof>" % done
            w.write(b"k%05d" % (done % 100000))
            assert await asyncio.wait_for(r.readexactly(6), 3) == b"k%05d" % (done % 100000)
        except Exception as exc:  # counted, not raised: the test reports every failure
            failures.append(f"request {done}: {exc!r}")
        await asyncio.sleep(0.01)
    w.write_eof()
    assert await r.read(-1) == b"<eof>"
    return done


def chain_under(anchor: Any, issuer: KeyPair, who: str) -> tuple[bytes, bytes]:
    """A valid chain for `who` from the old issuer under the old root: what an agent still holding
    a pre-rotation leaf presents."""
    ca = CertificateAuthority(TD, [anchor], issuer, 60)
    store = AgentIdentity("x", "x", "", TD).store
    store.request(who)
    key = store.pending[who].key
    pem = to_pem(ca.sign(key.public_key(), who)).encode()
    return pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


async def handshake(addr: tuple[str, int], ctx: ssl.SSLContext, sni: str | None = None) -> bool:
    """True when a TLS handshake with `addr` completes (and the server keeps the connection)."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(*addr, ssl=ctx, server_hostname=sni), 3)
    except (ssl.SSLError, ConnectionError, asyncio.TimeoutError):
        return False
    try:  # TLS 1.3: the server's verdict on our certificate arrives after the client's handshake
        w.write(wire.encode({"type": "ping"}))
        await w.drain()
        await asyncio.wait_for(r.read(1), 0.5)
        return not r.at_eof()
    except (ssl.SSLError, ConnectionError):
        return False
    except asyncio.TimeoutError:
        return True
    finally:
        w.close()


def test_root_rotation_in_three_steps_with_traffic_flowing() -> None:
    async def body() -> None:
        async with mesh(lifetime=LIFETIME, tap=False) as m:
            old_root, old_issuer = m.ca.anchors[0], m.ca.issuer
            ctl = Controller(m.ca)
            addr = await ctl.start()
            agents = {"node1": m.id1, "node2": m.id2}
            streams = [ConfigStream(addr, n, "", lambda cfg: None, identity=i, **FAST) for n, i in agents.items()]
            tasks = [asyncio.ensure_future(s.run()) for s in streams]
            stop, failures = asyncio.Event(), []
            load = asyncio.ensure_future(traffic(m, stop, failures))
            try:
                await until(lambda: all(s.connected for s in streams) and all(i.has_node_cert() for i in agents.values()))
                first_tunnels = m.node1.tunnels.connections_opened
                gens = {n: i.store.bundle_generation for n, i in agents.items()}

                # 1. the new root joins the bundle: pushed at once, no certificate answer needed
                new_root = new_trust_anchor(TD)
                ctl.identity.set_anchors([old_root, new_root.cert])
                both = ctl.identity.ca.bundle_pem()
                await until(lambda: all(i.store.bundle_pem == both for i in agents.values()), timeout=0.5)
                assert all(i.store.bundle_generation == gens[n] + 1 for n, i in agents.items())

                # 2. the issuer moves under the new root; every leaf is re-issued as it renews
                issuer = new_issuer(new_root, TD)
                ctl.identity.rotate_issuer(issuer)
                await until(lambda: all(c.chain[1] == issuer.cert for i in agents.values() for c in i.store.creds.values()),
                            timeout=4 * LIFETIME)
                # the controller's listener trusts the new root: a new-root node certificate connects
                node_cred = m.id1.credential(m.id1.node_identity)
                assert node_cred is not None and node_cred.chain[1] == issuer.cert
                assert await handshake(addr, m.id1.stream_ssl())

                # 3. the old root leaves the bundle
                ctl.identity.set_anchors([new_root.cert])
                only_new = ctl.identity.ca.bundle_pem()
                await until(lambda: all(i.store.bundle_pem == only_new for i in agents.values()), timeout=0.5)
                await asyncio.sleep(0.5)  # traffic keeps flowing on the new bundle
            finally:
                stop.set()
                done = await load
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert failures == [] and done > 20, (done, failures[:5])
            assert ctl.server.bundle_pushes["node1"] >= 3 and ctl.server.bundle_pushes["node2"] >= 3  # first + 2 changes
            assert ctl.identity.bundle_changes == 2
            assert m.node1.tunnels.connections_opened > first_tunnels  # new handshakes, new bundle

            # New handshakes refuse old-root certificates everywhere: node2's tunnel server ...
            stale_chain, stale_key = chain_under(old_root, old_issuer, CLIENT_ID)
            stale_tunnel = tlsctx.client_context(only_new, stale_chain, stale_key)
            stale_tunnel.set_alpn_protocols(["h2"])
            assert not await handshake(("127.0.0.1", m.tunnel_ports["node2"]), stale_tunnel, sni_name(ECHO_ID))
            cred = m.id1.credential(CLIENT_ID)
            assert cred is not None
            fresh = tlsctx.client_context(only_new, cred.chain_pem(), cred.key_pem())
            fresh.set_alpn_protocols(["h2"])
            assert await handshake(("127.0.0.1", m.tunnel_ports["node2"]), fresh, sni_name(ECHO_ID))
            # ... and the controller's stream listener (its context was rebuilt, not restarted)
            stale_node_chain, stale_node_key = chain_under(old_root, old_issuer, m.id1.node_identity)
            assert not await handshake(addr, tlsctx.client_context(only_new, stale_node_chain, stale_node_key))
            await ctl.server.close()
    run(body, budget=45)

