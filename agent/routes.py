"""HTTP routing for one request, sans-IO: HTTPRoute rules (Gateway API, GAMMA: parentRefs kind
Service) compiled per config into a table, matched against a request head, and a weighted backend
choice. The wire form (NodeConfig.extra["http_routes"], written by controller/routes.py) is plain
dicts; `compile_routes` turns it into frozen values and rejects a malformed route alone."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodemesh.fastpath import RouteMatcher

log = logging.getLogger(__name__)

EXTRA_KEY = "http_routes"


@dataclass(frozen=True)
class HeaderMatch:
    name: bytes  # lowercase
    value: bytes
    regex: re.Pattern[bytes] | None = None


@dataclass(frozen=True)
class Match:
    path_type: str = "PathPrefix"  # Exact | PathPrefix | RegularExpression
    path: str = "/"
    headers: tuple[HeaderMatch, ...] = ()
    method: bytes | None = None
    path_regex: re.Pattern[str] | None = None

    def matches(self, method: bytes, path: str, headers: Mapping[bytes, bytes]) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path_type == "Exact":
            if path != self.path:
                return False
        elif self.path_type == "PathPrefix":
            p = self.path.rstrip("/")
            if p and not (path == p or path.startswith(p + "/")):
                return False
        elif self.path_regex is not None and not self.path_regex.fullmatch(path):
            return False
        for h in self.headers:
            v = headers.get(h.name)
            if v is None:
                return False
            if h.regex is not None:
                if not h.regex.fullmatch(v):
                    return False
            elif v != h.value:
                return False
        return True


@dataclass(frozen=True)
class Backend:
    namespace: str
    name: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class RetryPolicy:
    codes: frozenset[int]
    attempts: int  # retries after the first attempt
    grpc_codes: frozenset[int] = frozenset()  # gRPC statuses retried (h2 path, agent/h2_proxy.py)


@dataclass(frozen=True)
class Rule:
    route: str  # "<namespace>/<name>", the route label of route_* metrics
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    timeout: float | None = None  # timeouts.request, seconds
    backend_timeout: float | None = None  # timeouts.backendRequest (per attempt)
    retry: RetryPolicy | None = None

    def pick_backend(self, rand: Callable[[], float] = random.random) -> Backend | None:
        total = sum(b.weight for b in self.backends)
        if total <= 0:
            return None
        x = rand() * total
        for b in self.backends:
            x -= b.weight
            if x < 0 and b.weight > 0:
                return b
        return next(b for b in reversed(self.backends) if b.weight > 0)


ParentKey = tuple[str, str, int]  # (namespace, service, port); port 0 = every port


class RouteTable:
    """Rules per parent service port, in Gateway API precedence order."""

    def __init__(self, rules: Mapping[ParentKey, Sequence[Rule]] | None = None) -> None:
        self._rules = {k: tuple(v) for k, v in (rules or {}).items()}
        self._fast = RouteMatcher(self._rules)  # fastpath/route.pyx: the same walk over typed records

    def rules_for(self, namespace: str, service: str, port: int) -> tuple[Rule, ...]:
        return self._rules.get((namespace, service, port), ()) + self._rules.get((namespace, service, 0), ())

    def match(self, namespace: str, service: str, port: int, method: bytes, path: str, headers: dict[bytes, bytes]) -> Rule | None:
        """The first rule with a matching match (rules_for is precedence-sorted), or None (Cython)."""
        return self._fast.match(namespace, service, port, method, path, headers)  # type: ignore[no-any-return]

    def match_reference(self, namespace: str, service: str, port: int, method: bytes, path: str, headers: Mapping[bytes, bytes]) -> Rule | None:
        """Pure-Python `match`: the test oracle of the Cython one."""
        for rule in self.rules_for(namespace, service, port):
            if any(m.matches(method, path, headers) for m in rule.matches):
                return rule
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self._rules.values())


def _match_sort_key(m: Match) -> tuple:
    # Gateway API precedence: exact path, then longest prefix, then method, then most headers.
    return (0 if m.path_type == "Exact" else 1 if m.path_type == "PathPrefix" else 2, -len(m.path), m.method is None, -len(m.headers))


def compile_rule(doc: Mapping[str, Any]) -> Rule:
    """One rule of the wire form; ValueError names the bad field."""
    matches = []
    for m in doc.get("matches") or [{}]:
        path = m.get("path") or {}
        ptype = path.get("type", "PathPrefix")
        pval = path.get("value", "/")
        if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
            raise ValueError(f"path type {ptype!r} is not Exact, PathPrefix or RegularExpression")
        if ptype != "RegularExpression" and not str(pval).startswith("/"):
            raise ValueError(f"path value {pval!r} must start with /")
        try:
            pre = re.compile(pval) if ptype == "RegularExpression" else None
        except re.error as exc:
            raise ValueError(f"path regex {pval!r}: {exc}") from None
        headers = []
        for h in m.get("headers") or []:
            htype = h.get("type", "Exact")
            name, value = str(h["name"]).lower().encode(), str(h["value"]).encode()
            if htype not in ("Exact", "RegularExpression"):
                raise ValueError(f"header match type {htype!r} is not Exact or RegularExpression")
            try:
                headers.append(HeaderMatch(name, value, re.compile(value) if htype == "RegularExpression" else None))
            except re.error as exc:
                raise ValueError(f"header regex {value!r}: {exc}") from None
        method = m.get("method")
        matches.append(Match(ptype, str(pval), tuple(headers), method.encode() if method else None, pre))
    backends = tuple(Backend(b["namespace"], b["name"], int(b["port"]), int(b.get("weight", 1))) for b in doc.get("backends", ()))
    retry = None
    if doc.get("retry"):
        r = doc["retry"]
        retry = RetryPolicy(frozenset(int(c) for c in r.get("codes", ())), int(r.get("attempts", 1)),
                            frozenset(int(c) for c in r.get("grpc_codes", ())))
    return Rule(
        route=str(doc["route"]),
        matches=tuple(sorted(matches, key=_match_sort_key)),
        backends=backends,
        timeout=doc.get("timeout"),
        backend_timeout=doc.get("backend_timeout"),
        retry=retry,
    )


def compile_routes(wire: Sequence[Mapping[str, Any]]) -> RouteTable:
    """The table from NodeConfig.extra["http_routes"]: [{"parent": [ns, svc, port], "rules": [...]}].
    A malformed entry is logged and skipped; the others still apply."""
    table: dict[ParentKey, list[tuple[tuple, Rule]]] = {}
    for entry in wire:
        try:
            ns, svc, port = entry["parent"]
            rules = [compile_rule(r) for r in entry["rules"]]
        except (KeyError, TypeError, ValueError) as exc:
            log.error("ignoring malformed http route %r: %s", entry.get("route", entry) if isinstance(entry, Mapping) else entry, exc)
            continue
        for rule in rules:
            key = min(_match_sort_key(m) for m in rule.matches)
            table.setdefault((ns, svc, int(port)), []).append((key, rule))
    return RouteTable({k: [r for _, r in sorted(v, key=lambda kr: kr[0])] for k, v in table.items()})
