"""Strict / permissive inbound mode enforced by real node proxies on loopback (the harness of
test_authz_proxy.py, mTLS off so cross-node goes over the plaintext 4143 tunnel): strict refuses the
plaintext connection before a byte reaches the pod even where the policy allows everyone, and
cuts a live one when the namespace turns strict; same-node meshed traffic is unaffected."""

from __future__ import annotations

import pytest

from .test_authz_proxy import CLIENT_IP, ECHO1_IP, ECHO2_IP, Echo, cluster_yaml, mesh, refused, run

pytestmark = pytest.mark.timeout(20)


def namespace(text: str, mode: str) -> str:
    """cluster_yaml with an allow-everyone default and the given inbound mode on the namespace."""
    ann = "config.nodemesh.io/default-inbound-policy: all-unauthenticated" + (f", config.nodemesh.io/inbound-mode: {mode}" if mode else "")
    out = text.replace("config.nodemesh.io/default-inbound-policy: deny", ann)
    assert out != text
    return out


def test_strict_refuses_plaintext_cross_node_and_keeps_same_node() -> None:
    async def body() -> None:
        async with mesh("") as m:
            m.apply(namespace(cluster_yaml(m.port), ""))  # permissive (default): plaintext allowed
            r, w = await m.connect(CLIENT_IP, ECHO2_IP)
            w.write(b"live")
            assert await r.readexactly(4) == b"live"
            assert Echo.accepted == [ECHO2_IP]

            m.apply(namespace(cluster_yaml(m.port), "strict"))
            try:  # the live plaintext one is cut
                cut = await r.read(1) == b""
            except ConnectionResetError:
                cut = True
            assert cut
            w.close()
            r, w = await m.connect(CLIENT_IP, ECHO2_IP)
            assert await refused(r, w)
            assert Echo.accepted == [ECHO2_IP]  # the refused one never reached the pod
            node2 = m.proxies["node2"]
            assert node2.metrics.errors("inbound", "plaintext_refused") == 1
            assert node2.authz.plaintext_count("refused_strict", "inbound_port") == 1
            assert node2.authz.count("terminate") == 1

            r, w = await m.connect(CLIENT_IP, ECHO1_IP)  # same node: meshed, authenticated, not plaintext-from-off-mesh
            w.write(b"same")
            assert await r.readexactly(4) == b"same"
            w.close()
            assert m.proxies["node1"].authz.plaintext_count("refused_strict") == 0

            m.apply(namespace(cluster_yaml(m.port), "permissive"))
            r, w = await m.connect(CLIENT_IP, ECHO2_IP)
            w.write(b"back")
            assert await r.readexactly(4) == b"back"
            w.close()

    run(body)
