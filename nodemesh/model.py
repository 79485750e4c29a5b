"""The cluster-state model: Kubernetes-shaped objects parsed from YAML or from the API server.

One model for both sources (standalone files, Kubernetes watch). Parsing is strict and pure: every
error names the source, the object and the field, and a failed batch leaves the state unchanged
(`ClusterState.apply` returns a new state or raises).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import yaml

from nodemesh import endpointslice_model, policy_model, route_model
from nodemesh.errors import ConfigError

MESH_LABEL = "nodemesh.io/mesh"
DEFAULT_TRUST_DOMAIN = "cluster.local"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class Node:
    name: str
    internal_ip: str | None = None  # status.addresses[type=InternalIP]
    pod_cidr: str | None = None  # spec.podCIDR
    labels: Mapping[str, str] = field(default_factory=dict)

    kind = "Node"
    namespace = ""


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    kind = "Namespace"
    namespace = ""


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str

    kind = "ServiceAccount"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: Union[int, str]
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    kind = "Service"


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Container:
    name: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node_name: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    containers: tuple[Container, ...] = ()
    pod_ip: str | None = None  # status.podIP: set by the lab (or the kubelet) once placed

    kind = "Pod"

    def identity(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
        return spiffe_id(self.namespace, self.service_account, trust_domain)


Object = Union[Node, Namespace, ServiceAccount, Service, Pod, policy_model.PolicyObject, route_model.HTTPRoute,
               endpointslice_model.EndpointSlice]
ObjectKey = tuple[str, str, str]  # (kind, namespace, name)

SUPPORTED_KINDS = ("Node", "Namespace", "ServiceAccount", "Service", "Pod") + policy_model.KINDS + route_model.KINDS \
    + endpointslice_model.KINDS


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def key_of(obj: Object) -> ObjectKey:
    return (obj.kind, obj.namespace, obj.name)


def describe(key: ObjectKey) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


# ---------------------------------------------------------------------------------------------
# Parsing (pure: text in, typed objects out)


class _Reader:
    """Walks one YAML document, raising ConfigError that names source, object and field path."""

    def __init__(self, doc: Mapping[str, Any], source: str, obj: str) -> None:
        self.doc, self.source, self.obj = doc, source, obj

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, obj=self.obj, field=path)

    def get(self, path: str, typ: type | tuple[type, ...], default: Any = ..., where: Any = None) -> Any:
        node: Any = self.doc if where is None else where
        for part in path.split(".") if where is None else [path]:
            if not isinstance(node, Mapping) or part not in node or node[part] is None:
                if default is ...:
                    raise self.fail(path, "is required")
                return default
            node = node[part]
        if not isinstance(node, typ) or (typ is int and isinstance(node, bool)):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.fail(path, f"must be {names}, got {type(node).__name__} {node!r}")
        return node

    def str_map(self, path: str) -> dict[str, str]:
        raw = self.get(path, dict, {})
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise self.fail(f"{path}.{k}", "must map strings to strings")
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
        return out

    def port(self, path: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.fail(path, f"must be a port number 1-65535, got {value!r}")
        return value

    def ip(self, path: str, value: Any) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except (ipaddress.AddressValueError, ValueError):
            raise self.fail(path, f"must be an IPv4 address, got {value!r}") from None


def _name(r: _Reader, path: str, pattern: re.Pattern[str] = _DNS_SUBDOMAIN) -> str:
    value = r.get(path, str)
    if not pattern.match(value):
        raise r.fail(path, f"{value!r} is not a valid Kubernetes name (lowercase letters, digits, '-')")
    return value


def _parse_node(r: _Reader) -> Node:
    ip = None
    for i, addr in enumerate(r.get("status.addresses", list, [])):
        if isinstance(addr, Mapping) and addr.get("type") == "InternalIP":
            ip = r.ip(f"status.addresses[{i}].address", addr.get("address"))
    cidr = r.get("spec.podCIDR", str, None)
    if cidr is not None:
        try:
            cidr = str(ipaddress.IPv4Network(cidr))
        except ValueError:
            raise r.fail("spec.podCIDR", f"must be an IPv4 CIDR, got {cidr!r}") from None
    return Node(name=_name(r, "metadata.name"), internal_ip=ip, pod_cidr=cidr, labels=r.str_map("metadata.labels"))


def _parse_namespace(r: _Reader) -> Namespace:
    return Namespace(
        name=_name(r, "metadata.name", _DNS_LABEL),
        labels=r.str_map("metadata.labels"),
        annotations=r.str_map("metadata.annotations"),
    )


def _parse_service(r: _Reader, ns: str) -> Service:
    raw_ports = r.get("spec.ports", list)
    if not raw_ports:
        raise r.fail("spec.ports", "must list at least one port")
    ports = []
    for i, p in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        if not isinstance(p, Mapping):
            raise r.fail(path, "must be a mapping with at least 'port'")
        if "port" not in p:
            raise r.fail(f"{path}.port", "is required")
        port = r.port(f"{path}.port", p["port"])
        target = p.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            if not _DNS_LABEL.match(target):
                raise r.fail(f"{path}.targetPort", f"{target!r} is neither a port number nor a port name")
        else:
            target = r.port(f"{path}.targetPort", int(target))
        proto = p.get("protocol", "TCP")
        if proto not in ("TCP", "UDP", "SCTP"):
            raise r.fail(f"{path}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}")
        ports.append(ServicePort(port=port, target_port=target, name=str(p.get("name", "")), protocol=proto))
    cip = r.get("spec.clusterIP", str, None)
    if cip is not None and cip != "None":
        cip = r.ip("spec.clusterIP", cip)
    elif cip == "None":
        cip = None
    return Service(
        namespace=ns,
        name=_name(r, "metadata.name", _DNS_LABEL),
        cluster_ip=cip,
        ports=tuple(ports),
        selector=r.str_map("spec.selector"),
        labels=r.str_map("metadata.labels"),
        annotations=r.str_map("metadata.annotations"),
    )


def _str_list(r: _Reader, path: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise r.fail(path, "must be a list of strings")
    return tuple(str(v) for v in value)


def _parse_pod(r: _Reader, ns: str) -> Pod:
    containers = []
    for i, c in enumerate(r.get("spec.containers", list, [])):
        path = f"spec.containers[{i}]"
        if not isinstance(c, Mapping):
            raise r.fail(path, "must be a mapping")
        env = {}
        for j, e in enumerate(c.get("env") or []):
            if not isinstance(e, Mapping) or "name" not in e:
                raise r.fail(f"{path}.env[{j}]", "must have a name and a value")
            env[str(e["name"])] = str(e.get("value", ""))
        cports = []
        for j, p in enumerate(c.get("ports") or []):
            if not isinstance(p, Mapping) or "containerPort" not in p:
                raise r.fail(f"{path}.ports[{j}].containerPort", "is required")
            cports.append(
                ContainerPort(
                    container_port=r.port(f"{path}.ports[{j}].containerPort", p["containerPort"]),
                    name=str(p.get("name", "")),
                    protocol=str(p.get("protocol", "TCP")),
                )
            )
        containers.append(
            Container(
                name=str(c.get("name", f"c{i}")),
                command=_str_list(r, f"{path}.command", c.get("command")),
                args=_str_list(r, f"{path}.args", c.get("args")),
                env=env,
                ports=tuple(cports),
            )
        )
    pod_ip = r.get("status.podIP", str, None)
    return Pod(
        namespace=ns,
        name=_name(r, "metadata.name"),
        node_name=_name(r, "spec.nodeName"),
        service_account=r.get("spec.serviceAccountName", str, "default"),
        labels=r.str_map("metadata.labels"),
        annotations=r.str_map("metadata.annotations"),
        containers=tuple(containers),
        pod_ip=r.ip("status.podIP", pod_ip) if pod_ip is not None else None,
    )


def parse_object(doc: Any, source: str, index: int = 0) -> Object:
    """Parses one Kubernetes-shaped document into a typed object."""
    if not isinstance(doc, Mapping):
        raise ConfigError("each YAML document must be a mapping with apiVersion, kind and metadata", source=source, obj=f"document {index + 1}")
    kind = doc.get("kind")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    label = f"{kind or '<no kind>'} {meta.get('namespace', '') + '/' if meta.get('namespace') else ''}{meta.get('name', '<no name>')}"
    r = _Reader(doc, source, label)
    if kind not in SUPPORTED_KINDS:
        raise r.fail("kind", f"unknown kind {kind!r}; supported kinds: {', '.join(SUPPORTED_KINDS)}")
    r.get("apiVersion", str)
    r.get("metadata", dict)
    if kind == "Node":
        return _parse_node(r)
    if kind == "Namespace":
        namespace = _parse_namespace(r)
        policy_model.check_default_annotation(r, namespace.annotations)  # authorization policy hook
        return namespace
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str) or not _DNS_LABEL.match(ns):
        raise r.fail("metadata.namespace", f"{ns!r} is not a valid namespace name")
    if kind == "ServiceAccount":
        return ServiceAccount(namespace=ns, name=_name(r, "metadata.name"))
    if kind == "Service":
        return _parse_service(r, ns)
    if kind in policy_model.KINDS:  # authorization policy hook
        return policy_model.parse(r, kind, ns)
    if kind in route_model.KINDS:  # HTTP routing hook
        return route_model.parse(r, kind, ns)
    if kind in endpointslice_model.KINDS:  # Kubernetes-computed endpoints hook
        return endpointslice_model.parse(r, kind, ns)
    pod = _parse_pod(r, ns)
    policy_model.check_default_annotation(r, pod.annotations)  # authorization policy hook
    return pod


def parse_documents(text: str, source: str) -> list[Object]:
    """Parses a multi-document YAML text. Raises ConfigError naming the source on any problem."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"is not valid YAML: {exc}", source=source) from None
    objs: list[Object] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            for j, item in enumerate(doc.get("items") or []):
                objs.append(parse_object(item, source, j))
        else:
            objs.append(parse_object(doc, source, i))
    return objs


def load_file(path: str) -> list[Object]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror}", source=path) from None
    return parse_documents(text, path)


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class ClusterState:
    """An immutable snapshot of cluster objects. Derived views live in the controller."""

    objects: Mapping[ObjectKey, Object] = field(default_factory=dict)
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def of_kind(self, kind: str) -> list[Any]:
        return [o for k, o in sorted(self.objects.items()) if k[0] == kind]

    @property
    def nodes(self) -> list[Node]:
        return self.of_kind("Node")

    @property
    def namespaces(self) -> list[Namespace]:
        return self.of_kind("Namespace")

    @property
    def services(self) -> list[Service]:
        return self.of_kind("Service")

    @property
    def pods(self) -> list[Pod]:
        return self.of_kind("Pod")

    def get(self, kind: str, namespace: str, name: str) -> Any:
        return self.objects.get((kind, namespace, name))

    def apply(self, objs: Iterable[Object], source: str = "") -> ClusterState:
        """Returns a new state with `objs` created or replaced; raises (leaving self as is) if invalid."""
        merged = dict(self.objects)
        for obj in objs:
            old = merged.get(key_of(obj))
            if isinstance(old, Pod) and isinstance(obj, Pod):
                if old.node_name != obj.node_name:
                    raise ConfigError(
                        f"is immutable (pod is on {old.node_name!r}); delete and recreate the pod to move it",
                        source=source, obj=describe(key_of(obj)), field="spec.nodeName",
                    )
                if obj.pod_ip is None and old.pod_ip is not None:
                    obj = replace(obj, pod_ip=old.pod_ip)
            merged[key_of(obj)] = obj
        state = replace(self, objects=merged)
        validate(state, source)
        return state

    def delete(self, keys: Iterable[ObjectKey]) -> ClusterState:
        merged = dict(self.objects)
        for k in keys:
            merged.pop(k, None)
        return replace(self, objects=merged)


def validate(state: ClusterState, source: str = "") -> None:
    """Cross-object checks: references resolve, addresses are unique."""
    nodes = {n.name for n in state.nodes}
    namespaces = {n.name for n in state.namespaces}
    seen_ips: dict[str, str] = {}
    for key, obj in sorted(state.objects.items()):
        what = describe(key)
        ns = getattr(obj, "namespace", "")
        if ns and namespaces and ns not in namespaces and ns != "default":
            raise ConfigError(f"namespace {ns!r} does not exist; add a Namespace object", source=source, obj=what, field="metadata.namespace")
        if isinstance(obj, Pod):
            if obj.node_name not in nodes:
                known = ", ".join(sorted(nodes)) or "none"
                raise ConfigError(f"node {obj.node_name!r} does not exist (nodes: {known})", source=source, obj=what, field="spec.nodeName")
            ip, fld = obj.pod_ip, "status.podIP"
        elif isinstance(obj, Service):
            ip, fld = obj.cluster_ip, "spec.clusterIP"
            names = [p.name for p in obj.ports]
            if len(obj.ports) > 1 and ("" in names or len(set(names)) != len(names)):
                raise ConfigError("ports must have unique names when a Service has more than one", source=source, obj=what, field="spec.ports")
        elif isinstance(obj, Node):
            ip, fld = obj.internal_ip, "status.addresses"
        else:
            continue
        if ip is not None:
            if ip in seen_ips:
                raise ConfigError(f"address {ip} is already used by {seen_ips[ip]}", source=source, obj=what, field=fld)
            seen_ips[ip] = what
    policy_model.validate(state, source)  # authorization policy hook: references, Server conflicts
    route_model.validate(state, source)  # HTTP routing hook: parent Services exist


def is_meshed(pod: Pod, namespace: Namespace | None) -> bool:
    """Opt-in by label, pod label first (Linkerd's annotation precedence): no injection needed."""
    value = pod.labels.get(MESH_LABEL) or (namespace.labels.get(MESH_LABEL) if namespace else None)
    return value == "enabled"


def dump_object(obj: Object) -> dict[str, Any]:
    """Back to Kubernetes-shaped YAML data (used by the lab to write the controller's directory)."""
    if isinstance(obj, policy_model.KIND_TYPES):  # authorization policy hook
        return policy_model.dump(obj)
    if isinstance(obj, route_model.KIND_TYPES):  # HTTP routing hook
        return route_model.dump(obj)
    if isinstance(obj, endpointslice_model.KIND_TYPES):  # Kubernetes-computed endpoints hook
        return endpointslice_model.dump(obj)
    meta: dict[str, Any] = {"name": obj.name}
    if obj.namespace:
        meta["namespace"] = obj.namespace
    for attr in ("labels", "annotations"):
        if getattr(obj, attr, None):
            meta[attr] = dict(getattr(obj, attr))
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": obj.kind, "metadata": meta}
    if isinstance(obj, Node):
        if obj.pod_cidr:
            doc["spec"] = {"podCIDR": obj.pod_cidr}
        if obj.internal_ip:
            doc["status"] = {"addresses": [{"type": "InternalIP", "address": obj.internal_ip}]}
    elif isinstance(obj, Service):
        spec: dict[str, Any] = {
            "selector": dict(obj.selector),
            "ports": [
                {k: v for k, v in (("name", p.name), ("port", p.port), ("targetPort", p.target_port), ("protocol", p.protocol)) if v != ""}
                for p in obj.ports
            ],
        }
        if obj.cluster_ip:
            spec["clusterIP"] = obj.cluster_ip
        doc["spec"] = spec
    elif isinstance(obj, Pod):
        doc["spec"] = {
            "nodeName": obj.node_name,
            "serviceAccountName": obj.service_account,
            "containers": [
                {
                    "name": c.name,
                    **({"command": list(c.command)} if c.command else {}),
                    **({"args": list(c.args)} if c.args else {}),
                    **({"env": [{"name": k, "value": v} for k, v in c.env.items()]} if c.env else {}),
                    **(
                        {"ports": [{"containerPort": p.container_port, **({"name": p.name} if p.name else {})} for p in c.ports]}
                        if c.ports
                        else {}
                    ),
                }
                for c in obj.containers
            ],
        }
        if obj.pod_ip:
            doc["status"] = {"podIP": obj.pod_ip}
    return doc
