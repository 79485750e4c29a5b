"""Route-level authorization at the destination, sans-IO: when a pod port's inbound must be served
as HTTP (so each request is authorized against HTTPRoute-targeted policies), and the
connection-level gate such a port uses.

Route-targeted AuthorizationPolicies only ever *add* clients (authz.authorize: Server and Namespace
policies first, then the matched route's). So a connection to an HTTP port is opened when *some*
route could authorize its client (`authorize_any_route`), and each request is then decided with
the route it matched (`authorize(..., http_route=...)`: 403 for the others, connection kept). A
client no policy of the port could ever authorize is still refused as a connection (reset), as on
a TCP port.
"""

from __future__ import annotations

import enum

from nodemesh.authz import ClientInfo, Decision, NodePolicy, authorize


class InboundHttp(enum.Enum):
    NO = "no"  # relay bytes (L4): the connection-level decision is the only one
    YES = "yes"  # the Server says HTTP/1: parse requests, authorize each one
    DETECT = "detect"  # route policies on a port of unknown protocol: HTTP/1 if the client speaks it


def inbound_http(policy: NodePolicy, namespace: str, pod: str, port: int) -> InboundHttp:
    """How the inbound side serves namespace/pod:port. Only a Server can ask for HTTP: its
    proxyProtocol HTTP/1, or route policies on a Server of unknown protocol (then detected);
    HTTP/2, gRPC, opaque and TLS Servers stay L4 here."""
    pp = policy.pod(namespace, pod)
    server = pp.server(port) if pp is not None else None
    if server is None:
        return InboundHttp.NO
    if server.protocol == "HTTP/1":
        return InboundHttp.YES
    if server.protocol == "unknown" and server.routes:
        return InboundHttp.DETECT
    return InboundHttp.NO


def authorize_any_route(policy: NodePolicy, client: ClientInfo, namespace: str, pod: str, port: int) -> Decision:
    """The connection-level gate of an HTTP-served port: allowed when the connection-level policy
    allows the client or some route policy of the port could allow some of its requests. The
    denial is the connection-level one (it names the Server and what was checked)."""
    d = authorize(policy, client, namespace, pod, port)
    if d.allowed:
        return d
    pp = policy.pod(namespace, pod)
    server = pp.server(port) if pp is not None else None
    for r in server.routes if server is not None else ():
        rd = authorize(policy, client, namespace, pod, port, http_route=r.route)
        if rd.allowed:
            return rd
    return d


def policy_route_name(route: str | None, pod_namespace: str) -> str | None:
    """A matched rule's route ("<namespace>/<name>", agent/routes.py) as route policies name it: the
    bare name for an HTTPRoute of the pod's namespace (policies target routes of their namespace)."""
    if route is None:
        return None
    ns, _, name = route.partition("/")
    return name if ns == pod_namespace else route
