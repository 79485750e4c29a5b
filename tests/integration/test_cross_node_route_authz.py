"""Route-level authorization of cross-node requests, enforced by the destination node: two real node
proxies on loopback, the client's node1 sending over the mTLS tunnel (and the plaintext 4143 inbound)
to echo-2 on node2, whose inbound parses each request, matches echo-remote's HTTPRoutes and
authorizes it (403 with l5d-proxy-error, the connection stays usable). Setup from test_l7_authz.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from nodemesh.scrape import total

from tests import objects_yaml as y

from .loopback import redirected_socket
from .test_l7_authz import CLIENT_ID, OTHER_ID, OTHER_IP, REMOTE_VIP, Backend, CLIENT_IP, mesh, run

pytestmark = pytest.mark.timeout(30)

# Namespace default deny (cluster_yaml), Server echo (HTTP/1) without Server-level policy; one
# route on echo-remote, GET /allowed only, open to the client's service account.
ROUTE_ALLOWED = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: allowed, namespace: demo}
spec:
  parentRefs: [{group: core, kind: Service, name: echo-remote, port: 80}]
  rules: [{matches: [{path: {type: Exact, value: /allowed}, method: GET}], backendRefs: [{name: echo-remote, port: 80}]}]
---
apiVersion: policy.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: client-on-allowed, namespace: demo}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: allowed}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: client}]
"""

ROUTE_ONLY = ROUTE_ALLOWED.split("---\napiVersion: policy.nodemesh.io")[0]  # the route, its policy gone


def metric(m, node: str, name: str, **labels: str) -> float:  # noqa: ANN001
    return total(m.proxies[node].metrics.render().decode(), name, labels)


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls-tunnel", "plaintext-4143"])
def test_cross_node_route_policy_is_enforced_per_request_by_the_destination(mtls: bool) -> None:
    async def body() -> None:
        async with mesh(ROUTE_ALLOWED, mtls=mtls) as m:
            c = await m.client(CLIENT_IP, REMOTE_VIP)
            status, _, data = await c.get("/allowed")
            assert status == 200 and json.loads(data)["pod"] == "echo-2"
            status, headers, _ = await c.get("/denied")  # same connection: 403 from node2, connection kept
            assert status == 403, status
            assert "Server echo" in headers["l5d-proxy-error"] and "route" not in headers["l5d-proxy-error"].split(":")[0]
            status, _, _ = await c.get("/allowed")
            assert status == 200
            assert [p for _, p in Backend.seen] == ["/allowed", "/allowed"]  # no denied byte reached the pod
            node2 = m.proxies["node2"]
            assert m.http_authz("node2", "allow", route_name="allowed", authz_name="client-on-allowed", srv_name="echo", client_id=CLIENT_ID) == 2
            assert m.http_authz("node2", "deny", route_name="default", srv_name="echo", client_id=CLIENT_ID,
                                tls="true" if mtls else "false") == 1
            assert node2.authz.count("allow", client_id=CLIENT_ID) == 1  # one stream, let in by the route policy
            inbound = {"direction": "inbound", "tls": "true" if mtls else "false", "client_id": CLIENT_ID, "dst_namespace": "demo"}
            assert metric(m, "node2", "request_total", **inbound) == 3
            assert metric(m, "node2", "response_total", status_code="403", **inbound) == 1
            assert metric(m, "node2", "response_total", status_code="200", **inbound) == 2
            # A client no policy of the port could allow is still refused as a stream by node2.
            o = await m.client(OTHER_IP, REMOTE_VIP)
            assert (await o.get("/allowed"))[0] == 403
            assert node2.authz.count("deny", client_id=OTHER_ID, srv_name="echo") == 1
            assert ("echo-2", "/allowed") in Backend.seen and len(Backend.seen) == 2

    run(body)


def test_removing_the_route_policy_cuts_the_live_stream_and_denies_the_next_request() -> None:
    async def body() -> None:
        async with mesh(ROUTE_ALLOWED, mtls=True) as m:
            c = await m.client(CLIENT_IP, REMOTE_VIP)
            assert (await c.get("/allowed"))[0] == 200
            m.apply(ROUTE_ONLY)  # no policy of node2's port allows the client any more
            assert m.proxies["node2"].authz.count("terminate", client_id=CLIENT_ID) == 1  # cut synchronously
            await asyncio.sleep(0.1)
            status, headers, _ = await c.get("/allowed")  # the client's own connection to node1 stays
            assert status == 403 and "no AuthorizationPolicy" in headers["l5d-proxy-error"]
            assert [p for _, p in Backend.seen] == ["/allowed"]
            m.apply(ROUTE_ALLOWED)
            assert (await c.get("/allowed"))[0] == 200

    run(body)


def test_policy_change_cuts_an_in_flight_request_the_new_policy_denies() -> None:
    slow = ROUTE_ALLOWED.replace("value: /allowed}", "value: /slow}").replace("name: allowed", "name: slowroute").replace("HTTPRoute, name: allowed", "HTTPRoute, name: slowroute")

    async def body() -> None:
        async with mesh(slow, mtls=True) as m:
            c = await m.client(CLIENT_IP, REMOTE_VIP)
            pending = asyncio.ensure_future(c.get("/slow"))
            while ("echo-2", "/slow") not in Backend.seen:
                await asyncio.sleep(0.01)
            m.apply(slow.split("---\napiVersion: policy.nodemesh.io")[0])
            status, _, _ = await asyncio.wait_for(pending, 1.0)  # node2 cut the stream; node1 answers
            assert status in (502, 503)
            assert m.proxies["node2"].authz.count("terminate", client_id=CLIENT_ID) == 1

    run(body)


# The same route on both services, so a request matches it whichever pod serves it (no
# backendRefs: each parent service serves its own requests).
ROUTE_BOTH = ROUTE_ALLOWED.replace("parentRefs: [{group: core, kind: Service, name: echo-remote, port: 80}]",
                                   "parentRefs: [{group: core, kind: Service, name: echo-remote, port: 80}, {group: core, kind: Service, name: echo-local, port: 80}]"
                                   ).replace(", backendRefs: [{name: echo-remote, port: 80}]", "")

MATRIX = [  # (how the client dials, pod, path): same-node and cross-node must enforce identically
    ("pod-ip", "echo-1", "same-node"),
    ("pod-ip", "echo-2", "cross-node"),
    ("vip", "echo-1", "same-node"),
    ("vip", "echo-2", "cross-node"),
]


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls", "plaintext"])
def test_route_policy_matrix_same_node_and_cross_node(mtls: bool) -> None:
    from .test_l7_authz import ECHO1_IP, ECHO2_IP, LOCAL_VIP

    async def body() -> None:
        async with mesh(ROUTE_BOTH, mtls=mtls) as m:
            for how, pod, where in MATRIX:
                if how == "vip":
                    c = await m.client(CLIENT_IP, LOCAL_VIP if pod == "echo-1" else REMOTE_VIP)
                else:  # the pod dialed directly: L4 at the source, HTTP only at the pod's inbound
                    c = await m.client_to(CLIENT_IP, (ECHO1_IP if pod == "echo-1" else ECHO2_IP, m.port))
                Backend.seen = []
                got = [(await c.get(p))[0] for p in ("/allowed", "/denied", "/allowed")]
                assert got == [200, 403, 200], (how, pod, where, got)
                assert Backend.seen == [(pod, "/allowed"), (pod, "/allowed")], (how, where, Backend.seen)
            # Each pod's own node decided the denied requests (node1 for echo-1, node2 for echo-2).
            assert m.http_authz("node1", "deny", client_id=CLIENT_ID, route_name="default", target_addr=f"{ECHO1_IP}:{m.port}") == 2
            assert m.http_authz("node2", "deny", client_id=CLIENT_ID, route_name="default", target_addr=f"{ECHO2_IP}:{m.port}") == 2
            # A client no policy allows: refused (a reset of the pod-IP connection, 403 via the VIP).
            o = await m.client(OTHER_IP, REMOTE_VIP)
            assert (await o.get("/allowed"))[0] == 403

    run(body)


SERVER_UNKNOWN = y.server("echo", "echo", "http")  # no proxyProtocol: detected


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls", "plaintext"])
def test_unknown_protocol_server_with_route_policies_detects_http(mtls: bool) -> None:
    """Route policies on a Server without a proxyProtocol: HTTP/1 clients are decided per request;
    a client speaking something else only a route policy would let in is refused (route policies
    cannot apply to bytes)."""
    from .test_l7_authz import ECHO2_IP

    async def body() -> None:
        async with mesh(ROUTE_BOTH + SERVER_UNKNOWN, mtls=mtls) as m:
            assert m.proxies["node2"].authz.policy.pods[0].servers[0].protocol == "unknown"
            loop = asyncio.get_running_loop()

            c = await m.client_to(CLIENT_IP, (ECHO2_IP, m.port))
            assert [(await c.get(p))[0] for p in ("/allowed", "/denied", "/allowed")] == [200, 403, 200]
            raw = await redirected_socket(CLIENT_IP, (ECHO2_IP, m.port), m.proxies["node1"].addresses.outbound, m.orig)
            await loop.sock_sendall(raw, b"\x16\x03\x01\x00\x05hello")  # TLS-looking bytes: not HTTP/1
            with pytest.raises((ConnectionResetError, ConnectionError)):
                data = await asyncio.wait_for(loop.sock_recv(raw, 100), 5.0)
                if not data:
                    raise ConnectionError("closed")
            raw.close()
            assert [p for _, p in Backend.seen] == ["/allowed", "/allowed"]
            assert m.proxies["node2"].authz.count("deny", client_id=CLIENT_ID, srv_name="echo") == 1

    run(body)
