"""Authorization policy objects (policy.nodemesh.io/v1alpha1), shaped after Linkerd's policy CRDs.

    Server                  selects pods (podSelector.matchLabels) and one port, with its protocol
    AuthorizationPolicy     targets a Server, a Namespace or an HTTPRoute; lists required authentications
    MeshTLSAuthentication   allowed client identities (SPIFFE IDs, `ns/*` wildcards) or ServiceAccount /
                            Namespace references
    NetworkAuthentication   allowed client networks (CIDRs with exceptions), for non-meshed clients

Registered into nodemesh.model's parser through a small hook (`KINDS`, `parse`, `dump`, `validate`,
`check_default_annotation`), so this module never imports model.py at run time (no import cycle).
Parsing is strict: each error names the source, the object and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from nodemesh.errors import ConfigError

if TYPE_CHECKING:
    from nodemesh.model import ClusterState, Pod, _Reader

POLICY_GROUP = "policy.nodemesh.io"
API_VERSION = f"{POLICY_GROUP}/v1alpha1"
DEFAULT_POLICY_ANNOTATION = "config.nodemesh.io/default-inbound-policy"
DEFAULT_POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated", "deny")
# Plaintext inbound (captured non-meshed clients, the plaintext 4143 tunnel): `strict` refuses it
# before any policy is evaluated, `permissive` (the default, as Linkerd) lets the policy decide.
INBOUND_MODE_ANNOTATION = "config.nodemesh.io/inbound-mode"
INBOUND_MODES = ("permissive", "strict")
PROXY_PROTOCOLS = ("unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS")
HTTP_PROTOCOLS = ("HTTP/1", "HTTP/2", "gRPC")

_SPIFFE = re.compile(r"^spiffe://[a-z0-9.-]+/ns/[a-z0-9-]+/sa/([a-z0-9.-]+|\*)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
SPIFFE_PATTERN, PORT_NAME_PATTERN = _SPIFFE.pattern, _PORT_NAME.pattern  # the CRD schemas (nodemesh/crds.py) say the same


@dataclass(frozen=True)
class Server:
    namespace: str
    name: str
    pod_selector: Mapping[str, str]  # matchLabels; {} selects every pod of the namespace
    port: Union[int, str]  # a number or a container port name
    proxy_protocol: str = "unknown"
    access_policy: str = "deny"  # for clients no AuthorizationPolicy authorizes (Linkerd's accessPolicy)
    pod_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # matchExpressions (key, operator, values)

    kind = "Server"

    def selects(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.pod_selector.items()):
            return False
        for key, op, values in self.pod_expressions:
            present = key in labels
            if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and present and labels[key] in values) \
                    or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
                return False
        return True


@dataclass(frozen=True)
class TargetRef:
    kind: str  # Server | Namespace | HTTPRoute
    name: str
    group: str = ""


@dataclass(frozen=True)
class AuthnRef:
    kind: str  # MeshTLSAuthentication | NetworkAuthentication | ServiceAccount
    name: str
    namespace: str


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    target: TargetRef
    required: tuple[AuthnRef, ...] = ()  # all must hold (Linkerd); none = every client

    kind = "AuthorizationPolicy"


@dataclass(frozen=True)
class IdentityRef:
    kind: str  # ServiceAccount | Namespace (= every service account in it)
    name: str
    namespace: str = ""


@dataclass(frozen=True)
class MeshTLSAuthentication:
    namespace: str
    name: str
    identities: tuple[str, ...] = ()  # "*", "spiffe://td/ns/N/sa/S", "spiffe://td/ns/N/sa/*"
    identity_refs: tuple[IdentityRef, ...] = ()

    kind = "MeshTLSAuthentication"


@dataclass(frozen=True)
class Network:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkAuthentication:
    namespace: str
    name: str
    networks: tuple[Network, ...] = field(default_factory=tuple)

    kind = "NetworkAuthentication"


PolicyObject = Union[Server, AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication]
KINDS = ("Server", "AuthorizationPolicy", "MeshTLSAuthentication", "NetworkAuthentication")
KIND_TYPES = (Server, AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication)
AUTHN_KINDS = _AUTHN_KINDS = ("MeshTLSAuthentication", "NetworkAuthentication", "ServiceAccount")
TARGET_KINDS = _TARGET_KINDS = ("Server", "Namespace", "HTTPRoute")
IDENTITY_REF_KINDS = ("ServiceAccount", "Namespace")


# ---- parsing ---------------------------------------------------------------------------------


def parse(r: _Reader, kind: str, namespace: str) -> PolicyObject:
    """Parses one policy document (kind in KINDS) already known to have metadata and a namespace."""
    api = r.get("apiVersion", str)
    if api != API_VERSION:
        raise r.fail("apiVersion", f"must be {API_VERSION!r} for {kind}, got {api!r}")
    name = r.get("metadata.name", str)
    if not _NAME.match(name):
        raise r.fail("metadata.name", f"{name!r} is not a valid Kubernetes name (lowercase letters, digits, '-')")
    r.get("spec", dict)
    if kind == "Server":
        return _parse_server(r, namespace, name)
    if kind == "AuthorizationPolicy":
        return _parse_authz(r, namespace, name)
    if kind == "MeshTLSAuthentication":
        return _parse_meshtls(r, namespace, name)
    return _parse_network(r, namespace, name)


def _parse_server(r: _Reader, ns: str, name: str) -> Server:
    sel = r.get("spec.podSelector", dict)
    unknown = set(sel) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise r.fail(f"spec.podSelector.{sorted(unknown)[0]}", "is not supported; select pods with matchLabels / matchExpressions")
    labels = r.str_map("spec.podSelector.matchLabels")
    exprs = []
    for i, e in enumerate(r.get("spec.podSelector.matchExpressions", list, [])):
        path = f"spec.podSelector.matchExpressions[{i}]"
        if not isinstance(e, Mapping) or not isinstance(e.get("key"), str):
            raise r.fail(f"{path}.key", "is required (a label key)")
        op, values = e.get("operator"), e.get("values") or []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise r.fail(f"{path}.operator", f"must be In, NotIn, Exists or DoesNotExist, got {op!r}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or (op in ("In", "NotIn")) != bool(values):
            raise r.fail(f"{path}.values", "must list strings for In/NotIn and be empty for Exists/DoesNotExist")
        exprs.append((e["key"], op, tuple(values)))
    port = r.get("spec.port", (int, str))
    if isinstance(port, str):
        if port.isdigit():
            port = r.port("spec.port", int(port))
        elif not _PORT_NAME.match(port):
            raise r.fail("spec.port", f"{port!r} is neither a port number nor a container port name")
    else:
        port = r.port("spec.port", port)
    proto = r.get("spec.proxyProtocol", str, "unknown")
    if proto not in PROXY_PROTOCOLS:
        raise r.fail("spec.proxyProtocol", f"must be one of {', '.join(PROXY_PROTOCOLS)}, got {proto!r}")
    access = r.get("spec.accessPolicy", str, "deny")
    if access not in DEFAULT_POLICIES:
        raise r.fail("spec.accessPolicy", f"unknown policy {access!r}; use one of {', '.join(DEFAULT_POLICIES)}")
    return Server(ns, name, labels, port, proto, access, tuple(exprs))


def _ref_fields(r: _Reader, path: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise r.fail(path, "must be a mapping with kind and name")
    for key in ("kind", "name"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise r.fail(f"{path}.{key}", "is required (a string)")
    return raw


def _parse_authz(r: _Reader, ns: str, name: str) -> AuthorizationPolicy:
    raw = _ref_fields(r, "spec.targetRef", r.get("spec.targetRef", dict))
    if raw["kind"] not in _TARGET_KINDS:
        raise r.fail("spec.targetRef.kind", f"must be one of {', '.join(_TARGET_KINDS)}, got {raw['kind']!r}")
    target = TargetRef(raw["kind"], raw["name"], str(raw.get("group", "")))
    refs = []
    for i, ref in enumerate(r.get("spec.requiredAuthenticationRefs", list, [])):
        path = f"spec.requiredAuthenticationRefs[{i}]"
        ref = _ref_fields(r, path, ref)
        if ref["kind"] not in _AUTHN_KINDS:
            raise r.fail(f"{path}.kind", f"must be one of {', '.join(_AUTHN_KINDS)}, got {ref['kind']!r}")
        ref_ns = ref.get("namespace") or ns
        if ref["kind"] != "ServiceAccount" and ref_ns != ns:
            raise r.fail(f"{path}.namespace", "authentications must be in the policy's own namespace")
        refs.append(AuthnRef(ref["kind"], ref["name"], str(ref_ns)))
    return AuthorizationPolicy(ns, name, target, tuple(refs))


def _parse_meshtls(r: _Reader, ns: str, name: str) -> MeshTLSAuthentication:
    identities = []
    for i, ident in enumerate(r.get("spec.identities", list, [])):
        if not isinstance(ident, str) or not (ident == "*" or _SPIFFE.match(ident)):
            raise r.fail(
                f"spec.identities[{i}]",
                f"{ident!r} is not an identity; use '*', spiffe://<trust-domain>/ns/<ns>/sa/<sa> or .../sa/* for a whole namespace",
            )
        identities.append(ident)
    refs = []
    for i, ref in enumerate(r.get("spec.identityRefs", list, [])):
        path = f"spec.identityRefs[{i}]"
        ref = _ref_fields(r, path, ref)
        if ref["kind"] not in ("ServiceAccount", "Namespace"):
            raise r.fail(f"{path}.kind", f"must be ServiceAccount or Namespace, got {ref['kind']!r}")
        ref_ns = "" if ref["kind"] == "Namespace" else str(ref.get("namespace") or ns)
        refs.append(IdentityRef(ref["kind"], ref["name"], ref_ns))
    if not identities and not refs:
        raise r.fail("spec.identities", "list at least one identity (or spec.identityRefs)")
    return MeshTLSAuthentication(ns, name, tuple(identities), tuple(refs))


def parse_cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or a bare address = a /32 or /128); host bits must be zero. Raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"must be a CIDR string, got {value!r}")
    return ipaddress.ip_network(value, strict=True)


def _cidr(r: _Reader, path: str, value: Any) -> str:
    try:
        return str(parse_cidr(value))
    except ValueError as exc:
        raise r.fail(path, f"{value!r} is not a valid CIDR ({exc})") from None


def _parse_network(r: _Reader, ns: str, name: str) -> NetworkAuthentication:
    nets = []
    raw = r.get("spec.networks", list)
    if not raw:
        raise r.fail("spec.networks", "list at least one network")
    for i, n in enumerate(raw):
        path = f"spec.networks[{i}]"
        if not isinstance(n, Mapping) or "cidr" not in n:
            raise r.fail(f"{path}.cidr", "is required")
        cidr = _cidr(r, f"{path}.cidr", n["cidr"])
        excepts = n.get("except") or []
        if not isinstance(excepts, list):
            raise r.fail(f"{path}.except", "must be a list of CIDRs")
        nets.append(Network(cidr, tuple(_cidr(r, f"{path}.except[{j}]", e) for j, e in enumerate(excepts))))
    return NetworkAuthentication(ns, name, tuple(nets))


def check_default_annotation(r: _Reader, annotations: Mapping[str, str]) -> None:
    """Namespace / Pod annotation: an unknown default policy name is an error, not a silent allow."""
    value = annotations.get(DEFAULT_POLICY_ANNOTATION)
    if value is not None and value not in DEFAULT_POLICIES:
        raise r.fail(
            f"metadata.annotations.{DEFAULT_POLICY_ANNOTATION}",
            f"unknown default policy {value!r}; use one of {', '.join(DEFAULT_POLICIES)}",
        )
    mode = annotations.get(INBOUND_MODE_ANNOTATION)
    if mode is not None and mode not in INBOUND_MODES:
        raise r.fail(
            f"metadata.annotations.{INBOUND_MODE_ANNOTATION}",
            f"unknown inbound mode {mode!r}; use one of {', '.join(INBOUND_MODES)}",
        )


def check_default_policy(value: str, where: str) -> str:
    """The cluster-wide default (a controller flag): same names as the annotation."""
    if value not in DEFAULT_POLICIES:
        raise ConfigError(f"unknown default policy {value!r}; use one of {', '.join(DEFAULT_POLICIES)}", source=where)
    return value


# ---- dumping (the lab writes the controller's directory from objects) --------------------------


def dump(obj: PolicyObject) -> dict[str, Any]:
    spec: dict[str, Any]
    if isinstance(obj, Server):
        selector: dict[str, Any] = {"matchLabels": dict(obj.pod_selector)}
        if obj.pod_expressions:
            selector["matchExpressions"] = [{"key": k, "operator": op, **({"values": list(v)} if v else {})} for k, op, v in obj.pod_expressions]
        spec = {"podSelector": selector, "port": obj.port, "proxyProtocol": obj.proxy_protocol,
                "accessPolicy": obj.access_policy}
    elif isinstance(obj, AuthorizationPolicy):
        t = obj.target
        spec = {
            "targetRef": {**({"group": t.group} if t.group else {}), "kind": t.kind, "name": t.name},
            "requiredAuthenticationRefs": [{"kind": a.kind, "name": a.name, "namespace": a.namespace} for a in obj.required],
        }
    elif isinstance(obj, MeshTLSAuthentication):
        spec = {}
        if obj.identities:
            spec["identities"] = list(obj.identities)
        if obj.identity_refs:
            spec["identityRefs"] = [{"kind": i.kind, "name": i.name, **({"namespace": i.namespace} if i.namespace else {})} for i in obj.identity_refs]
    else:
        spec = {"networks": [{"cidr": n.cidr, **({"except": list(n.except_)} if n.except_ else {})} for n in obj.networks]}
    return {"apiVersion": API_VERSION, "kind": obj.kind, "metadata": {"name": obj.name, "namespace": obj.namespace}, "spec": spec}


# ---- cross-object validation -----------------------------------------------------------------


def server_port(server: Server, pod: Pod) -> int | None:
    """The pod port a Server selects on `pod`, or None if it does not select that pod."""
    if pod.namespace != server.namespace or not server.selects(pod.labels):
        return None
    if isinstance(server.port, int):
        return server.port
    for c in pod.containers:
        for cp in c.ports:
            if cp.name == server.port:
                return cp.container_port
    return None


def _fail(source: str, obj: Any, fld: str, message: str) -> ConfigError:
    return ConfigError(message, source=source, obj=f"{obj.kind} {obj.namespace}/{obj.name}", field=fld)


def validate(state: ClusterState, source: str = "") -> None:
    """References resolve and no two Servers claim one pod port. Raises ConfigError naming the
    offending object (the file source drops just that object and keeps the rest)."""
    has = lambda kind, ns, name: state.get(kind, ns, name) is not None  # noqa: E731
    for pol in state.of_kind("AuthorizationPolicy"):
        t = pol.target
        if t.kind == "Namespace" and t.name != pol.namespace:
            raise _fail(source, pol, "spec.targetRef.name", f"a policy can only target its own namespace {pol.namespace!r}, not {t.name!r}")
        if t.kind in ("Server", "HTTPRoute") and not has(t.kind, pol.namespace, t.name):
            raise _fail(source, pol, "spec.targetRef.name", f"{t.kind} {pol.namespace}/{t.name} does not exist")
        for i, a in enumerate(pol.required):
            if a.kind == "ServiceAccount" and a.name == "default":
                continue  # every namespace has one, declared or not
            if not has(a.kind, a.namespace, a.name):
                raise _fail(source, pol, f"spec.requiredAuthenticationRefs[{i}].name", f"{a.kind} {a.namespace}/{a.name} does not exist")
    for authn in state.of_kind("MeshTLSAuthentication"):
        for i, ref in enumerate(authn.identity_refs):
            missing = (
                not has("Namespace", "", ref.name) if ref.kind == "Namespace"
                else ref.name != "default" and not has("ServiceAccount", ref.namespace, ref.name)
            )
            if missing:
                what = f"Namespace {ref.name}" if ref.kind == "Namespace" else f"ServiceAccount {ref.namespace}/{ref.name}"
                raise _fail(source, authn, f"spec.identityRefs[{i}].name", f"{what} does not exist")
    claimed: dict[tuple[str, str, int], Server] = {}
    for server in state.of_kind("Server"):
        for pod in state.of_kind("Pod"):
            port = server_port(server, pod)
            if port is None:
                continue
            other = claimed.setdefault((pod.namespace, pod.name, port), server)
            if other is not server:
                raise _fail(
                    source, server, "spec.port",
                    f"selects port {port} of pod {pod.namespace}/{pod.name}, which Server {other.namespace}/{other.name} already selects",
                )
