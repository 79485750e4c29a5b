"""Route-level authorization at the destination (nodemesh/authz_routes.py), table-driven."""

from __future__ import annotations

import pytest

from nodemesh.authz import Authorization, ClientInfo, NodePolicy, PodPolicy, RoutePolicy, ServerPolicy, authorize
from nodemesh.authz_routes import InboundHttp, authorize_any_route, inbound_http, policy_route_name

CLIENT = "spiffe://cluster.local/ns/demo/sa/client"
OTHER = "spiffe://cluster.local/ns/demo/sa/other"
ROGUE = "spiffe://cluster.local/ns/demo/sa/rogue"

ALLOW_CLIENT = Authorization("allow-client", "Server", ((CLIENT,),))
OTHER_ON_HEALTH = Authorization("other-on-health", "HTTPRoute", ((OTHER,),))


def policy(protocol: str = "HTTP/1", routes: bool = True, server_authz: bool = True) -> NodePolicy:
    server = ServerPolicy("echo", 8080, protocol, (ALLOW_CLIENT,) if server_authz else (),
                          (RoutePolicy("health", (OTHER_ON_HEALTH,)),) if routes else ())
    return NodePolicy((PodPolicy("demo", "echo-1", "10.0.0.1", "deny", "annotation", (server,)),), unknown_pod="deny")


@pytest.mark.parametrize("protocol, routes, port, want", [
    ("HTTP/1", False, 8080, InboundHttp.YES),  # the Server says HTTP/1: parsed even without routes
    ("HTTP/1", True, 8080, InboundHttp.YES),
    ("unknown", True, 8080, InboundHttp.DETECT),  # route policies, protocol unknown: detect
    ("unknown", False, 8080, InboundHttp.NO),
    ("HTTP/2", True, 8080, InboundHttp.NO),  # h2/gRPC/opaque/TLS stay L4 here
    ("gRPC", True, 8080, InboundHttp.NO),
    ("opaque", True, 8080, InboundHttp.NO),
    ("TLS", True, 8080, InboundHttp.NO),
    ("HTTP/1", True, 9090, InboundHttp.NO),  # no Server selects the port
])
def test_inbound_http_mode(protocol: str, routes: bool, port: int, want: InboundHttp) -> None:
    assert inbound_http(policy(protocol, routes), "demo", "echo-1", port) is want


def test_inbound_http_mode_of_an_unlisted_pod_is_l4() -> None:
    assert inbound_http(policy(), "demo", "nobody", 8080) is InboundHttp.NO


@pytest.mark.parametrize("ident, routes, allowed, authz_name", [
    (CLIENT, True, True, "allow-client"),  # the connection-level policy allows it
    (OTHER, True, True, "other-on-health"),  # only a route policy could: the connection opens
    (ROGUE, True, False, ""),  # nothing could: refused as a connection
    (OTHER, False, False, ""),
    (None, True, False, ""),
])
def test_authorize_any_route(ident: str | None, routes: bool, allowed: bool, authz_name: str) -> None:
    d = authorize_any_route(policy(routes=routes), ClientInfo(ident, "10.0.0.9", tls=True), "demo", "echo-1", 8080)
    assert (d.allowed, d.authz_name) == (allowed, authz_name)
    if not allowed:  # the denial is the connection-level one: it names the Server
        assert "Server echo" in d.reason


def test_any_route_gate_then_per_request_decisions() -> None:
    p, other = policy(), ClientInfo(OTHER, "10.0.0.9", tls=True)
    assert authorize_any_route(p, other, "demo", "echo-1", 8080).allowed
    assert authorize(p, other, "demo", "echo-1", 8080, http_route="health").allowed
    assert not authorize(p, other, "demo", "echo-1", 8080, http_route="api").allowed
    assert not authorize(p, other, "demo", "echo-1", 8080, http_route=None).allowed  # no route matched


@pytest.mark.parametrize("route, ns, want", [
    ("demo/health", "demo", "health"),
    ("ops/health", "demo", "ops/health"),  # another namespace's route is never a bare name here
    (None, "demo", None),
])
def test_policy_route_name(route: str | None, ns: str, want: str | None) -> None:
    assert policy_route_name(route, ns) == want
