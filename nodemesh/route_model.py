"""Gateway API HTTPRoute (gateway.networking.k8s.io/v1) attached to Services (GAMMA: parentRefs
kind Service), parsed strictly into the wire form the agents compile (agent/routes.py).

Supported: matches (path Exact/PathPrefix/RegularExpression, headers Exact/RegularExpression,
method), weighted backendRefs (kind Service), timeouts.request / timeouts.backendRequest, retries
from the rule's `retry` (GEP-1731: codes, attempts) or Linkerd's annotations
`retry.linkerd.io/http` ("5xx", "gateway-error" or codes/ranges like "500,502-504") and
`retry.linkerd.io/limit`, and `retry.linkerd.io/grpc` (gRPC status names) for h2/gRPC requests. Registered into nodemesh.model through a hook (KINDS, parse, dump,
validate) like policy_model, so this module does not import model.py at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodemesh import grpc_status
from nodemesh.errors import ConfigError

if TYPE_CHECKING:
    from nodemesh.model import ClusterState, _Reader

API_VERSION = "gateway.networking.k8s.io/v1"
KINDS = ("HTTPRoute",)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
RETRY_HTTP_ANNOTATION = "retry.linkerd.io/http"
RETRY_LIMIT_ANNOTATION = "retry.linkerd.io/limit"
RETRY_GRPC_ANNOTATION = "retry.linkerd.io/grpc"  # gRPC status names/codes, e.g. "unavailable,internal"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DURATION = re.compile(r"^((\d+)h)?((\d+)m(?!s))?((\d+)s)?((\d+)ms)?$")


@dataclass(frozen=True)
class HTTPRoute:
    namespace: str
    name: str
    parents: tuple[tuple[str, str, int], ...]  # (namespace, service, port or 0)
    rules: tuple[Mapping[str, Any], ...]  # wire form, see agent/routes.compile_rule
    annotations: Mapping[str, str]
    raw_spec: Mapping[str, Any]  # as written, for dump()

    kind = "HTTPRoute"


KIND_TYPES = (HTTPRoute,)


def duration(value: Any) -> float:
    """Gateway API duration ("200ms", "1s", "1m30s") in seconds; ValueError names the value."""
    m = _DURATION.match(str(value))
    if not isinstance(value, str) or not m or not any(m.groups()):
        raise ValueError(f"{value!r} is not a Gateway API duration like 200ms, 10s or 1m30s")
    h, mi, s, ms = (int(g) if g else 0 for g in (m.group(2), m.group(4), m.group(6), m.group(8)))
    return h * 3600 + mi * 60 + s + ms / 1000


def retry_codes(value: str) -> frozenset[int]:
    """`retry.linkerd.io/http` value → status codes; ValueError names the bad item."""
    codes: set[int] = set()
    for item in (s.strip() for s in value.split(",")):
        if item == "5xx":
            codes.update(range(500, 600))
        elif item == "gateway-error":
            codes.update((502, 503, 504))
        elif re.fullmatch(r"\d{3}(-\d{3})?", item):
            lo, _, hi = item.partition("-")
            a, b = int(lo), int(hi or lo)
            if not (100 <= a <= b <= 599):
                raise ValueError(f"retry status range {item!r} is outside 100-599")
            codes.update(range(a, b + 1))
        else:
            raise ValueError(f"retry condition {item!r} is not 5xx, gateway-error or a status code/range")
    return frozenset(codes)


OPAQUE_PORTS_ANNOTATION = "config.linkerd.io/opaque-ports"


def parse_opaque_ports(value: str) -> frozenset[int]:
    """`config.linkerd.io/opaque-ports` value: comma-separated ports and ranges ("3306,5432-5434").
    Raises ValueError naming the bad item."""
    ports: set[int] = set()
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        lo_s, sep, hi_s = item.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"opaque port {item!r} is not a port number or a range like 5432-5434") from None
        if not (1 <= lo <= hi <= 65535):
            raise ValueError(f"opaque port {item!r} is outside 1-65535 or an empty range")
        if hi - lo > 1024:
            raise ValueError(f"opaque port range {item!r} spans more than 1024 ports")
        ports.update(range(lo, hi + 1))
    return frozenset(ports)


def parse(r: _Reader, kind: str, namespace: str) -> HTTPRoute:
    api = r.get("apiVersion", str)
    if api != API_VERSION:
        raise r.fail("apiVersion", f"must be {API_VERSION!r} for HTTPRoute, got {api!r}")
    name = r.get("metadata.name", str)
    if not _NAME.match(name):
        raise r.fail("metadata.name", f"{name!r} is not a valid Kubernetes name")
    annotations = r.str_map("metadata.annotations")
    spec = r.get("spec", dict)
    parents = []
    for i, p in enumerate(r.get("parentRefs", list, where=spec)):
        path = f"spec.parentRefs[{i}]"
        if not isinstance(p, Mapping):
            raise r.fail(path, "must be a mapping")
        if p.get("kind", "Gateway") != "Service" or p.get("group", "core") not in ("", "core"):
            raise r.fail(f"{path}.kind", "only parentRefs of kind Service (group core) are supported (GAMMA mesh routes)")
        pname = r.get("name", str, where=p)
        port = r.port(f"{path}.port", p["port"]) if p.get("port") is not None else 0
        parents.append((str(p.get("namespace", namespace)), pname, port))
    if not parents:
        raise r.fail("spec.parentRefs", "needs at least one Service")
    retry_default = None
    if RETRY_HTTP_ANNOTATION in annotations or RETRY_GRPC_ANNOTATION in annotations:
        codes: frozenset[int] = frozenset()
        try:
            if RETRY_HTTP_ANNOTATION in annotations:
                codes = retry_codes(annotations[RETRY_HTTP_ANNOTATION])
        except ValueError as exc:
            raise r.fail(f"metadata.annotations.{RETRY_HTTP_ANNOTATION}", str(exc)) from None
        limit = annotations.get(RETRY_LIMIT_ANNOTATION, "1")
        if not limit.isdigit() or not 1 <= int(limit) <= 10:
            raise r.fail(f"metadata.annotations.{RETRY_LIMIT_ANNOTATION}", f"must be a number 1-10, got {limit!r}")
        retry_default = {"codes": sorted(codes), "attempts": int(limit)}
        if RETRY_GRPC_ANNOTATION in annotations:
            try:
                retry_default["grpc_codes"] = sorted(grpc_status.retry_codes(annotations[RETRY_GRPC_ANNOTATION]))
            except ValueError as exc:
                raise r.fail(f"metadata.annotations.{RETRY_GRPC_ANNOTATION}", str(exc)) from None
    rules = []
    for i, rule in enumerate(r.get("rules", list, [], where=spec) or [{}]):
        rules.append(_rule(r, f"spec.rules[{i}]", rule, namespace, parents, f"{namespace}/{name}", retry_default))
    return HTTPRoute(namespace, name, tuple(parents), tuple(rules), annotations, spec)


def _rule(r: _Reader, path: str, rule: Any, ns: str, parents: list, route: str, retry_default: Any) -> dict[str, Any]:
    if not isinstance(rule, Mapping):
        raise r.fail(path, "must be a mapping")
    matches = []
    for j, m in enumerate(rule.get("matches") or []):
        mp = f"{path}.matches[{j}]"
        if not isinstance(m, Mapping):
            raise r.fail(mp, "must be a mapping")
        out: dict[str, Any] = {}
        if m.get("path") is not None:
            p = m["path"]
            ptype, pval = p.get("type", "PathPrefix"), p.get("value", "/")
            if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
                raise r.fail(f"{mp}.path.type", f"must be Exact, PathPrefix or RegularExpression, got {ptype!r}")
            if not isinstance(pval, str) or (ptype != "RegularExpression" and not pval.startswith("/")):
                raise r.fail(f"{mp}.path.value", f"must be a string starting with '/', got {pval!r}")
            if ptype == "RegularExpression":
                try:
                    re.compile(pval)
                except re.error as exc:
                    raise r.fail(f"{mp}.path.value", f"invalid regular expression: {exc}") from None
            out["path"] = {"type": ptype, "value": pval}
        headers = []
        for k, h in enumerate(m.get("headers") or []):
            hp = f"{mp}.headers[{k}]"
            if not isinstance(h, Mapping) or not isinstance(h.get("name"), str) or not isinstance(h.get("value"), str):
                raise r.fail(hp, "needs string name and value")
            htype = h.get("type", "Exact")
            if htype not in ("Exact", "RegularExpression"):
                raise r.fail(f"{hp}.type", f"must be Exact or RegularExpression, got {htype!r}")
            headers.append({"name": h["name"], "value": h["value"], "type": htype})
        if headers:
            out["headers"] = headers
        if m.get("method") is not None:
            if m["method"] not in METHODS:
                raise r.fail(f"{mp}.method", f"must be one of {', '.join(METHODS)}, got {m['method']!r}")
            out["method"] = m["method"]
        matches.append(out)
    backends = []
    for j, b in enumerate(rule.get("backendRefs") or []):
        bp = f"{path}.backendRefs[{j}]"
        if not isinstance(b, Mapping) or not isinstance(b.get("name"), str):
            raise r.fail(bp, "needs a Service name")
        if b.get("kind", "Service") != "Service":
            raise r.fail(f"{bp}.kind", f"only Service backends are supported, got {b.get('kind')!r}")
        if b.get("port") is None:
            raise r.fail(f"{bp}.port", "is required for a Service backend")
        weight = b.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
            raise r.fail(f"{bp}.weight", f"must be an integer 0-1000000, got {weight!r}")
        backends.append({"namespace": b.get("namespace", ns), "name": b["name"], "port": r.port(f"{bp}.port", b["port"]), "weight": weight})
    out_rule: dict[str, Any] = {"route": route, "matches": matches or [{}], "backends": backends}
    timeouts = rule.get("timeouts") or {}
    for key, wire in (("request", "timeout"), ("backendRequest", "backend_timeout")):
        if timeouts.get(key) is not None:
            try:
                out_rule[wire] = duration(timeouts[key])
            except ValueError as exc:
                raise r.fail(f"{path}.timeouts.{key}", str(exc)) from None
    retry = rule.get("retry")
    if retry is not None:
        if not isinstance(retry, Mapping):
            raise r.fail(f"{path}.retry", "must be a mapping with codes and attempts")
        codes = retry.get("codes") or [500, 502, 503, 504]
        if not all(isinstance(c, int) and 400 <= c <= 599 for c in codes):
            raise r.fail(f"{path}.retry.codes", f"must be HTTP status codes 400-599, got {codes!r}")
        attempts = retry.get("attempts", 1)
        if not isinstance(attempts, int) or not 1 <= attempts <= 10:
            raise r.fail(f"{path}.retry.attempts", f"must be an integer 1-10, got {attempts!r}")
        out_rule["retry"] = {"codes": sorted(codes), "attempts": attempts}
    elif retry_default is not None:
        out_rule["retry"] = retry_default
    return out_rule


def dump(obj: HTTPRoute) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": obj.name, "namespace": obj.namespace}
    if obj.annotations:
        meta["annotations"] = dict(obj.annotations)
    return {"apiVersion": API_VERSION, "kind": "HTTPRoute", "metadata": meta, "spec": dict(obj.raw_spec)}


def validate(state: ClusterState, source: str = "") -> None:
    """Opaque-ports annotations parse; parent Services exist (a backend that does not exist only fails its own requests, 503)."""
    for svc in state.services:
        if OPAQUE_PORTS_ANNOTATION in svc.annotations:
            try:
                parse_opaque_ports(svc.annotations[OPAQUE_PORTS_ANNOTATION])
            except ValueError as exc:
                raise ConfigError(str(exc), source=source, obj=f"Service {svc.namespace}/{svc.name}", field=f"metadata.annotations.{OPAQUE_PORTS_ANNOTATION}") from None
    for route in state.of_kind("HTTPRoute"):
        for i, (ns, svc, _port) in enumerate(route.parents):
            if state.get("Service", ns, svc) is None:
                raise ConfigError(f"parent Service {ns}/{svc} does not exist", source=source, obj=f"HTTPRoute {route.namespace}/{route.name}", field=f"spec.parentRefs[{i}]")
