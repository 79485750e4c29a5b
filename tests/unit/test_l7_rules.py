"""Sans-IO rules of the L7 path: circuit breaker, retry budget, route compile/match, HTTPRoute
parsing (with its bad-input errors), opaque ports, detection memory."""

from __future__ import annotations

import pytest

from nodemesh.agent.breaker import Breaker, BreakerPolicy
from nodemesh.agent.detect import Detected, PortMemory, Protocol, conclude
from nodemesh.agent.retry_budget import RetryBudget
from nodemesh.agent.routes import compile_routes
from nodemesh.controller.discovery import node_config
from nodemesh.errors import ConfigError
from nodemesh.model import ClusterState, parse_documents
from nodemesh.route_model import duration, parse_opaque_ports, retry_codes


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_ejects_after_seven_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(), clock, rand=lambda: 0.5)  # jitter midpoint: penalty exactly 1 s, 2 s...
    for _ in range(6):
        assert b.available()
        b.dispatched()
        b.failure()
    b.success()  # a success resets the count
    for _ in range(7):
        b.dispatched()
        b.failure()
    assert not b.available() and b.state == "open"
    clock.t += 0.99
    assert not b.available()
    clock.t += 0.02
    assert b.available()  # probation: one probe
    b.dispatched()
    assert not b.available()  # only one
    b.failure()  # the probe failed: ejected again, for twice as long
    clock.t += 1.5
    assert not b.available()
    clock.t += 0.6
    assert b.available()
    b.dispatched()
    b.success()
    assert b.state == "closed" and b.available() and b.ejections == 0


def test_breaker_penalty_is_capped_and_jittered() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(max_failures=1), clock, rand=lambda: 1.0)
    for _ in range(10):
        b.failure()
        assert b.until - clock.t <= 60 * 1.5
        clock.t = b.until
        assert b.available()
        b.dispatched()
    b.failure()
    assert b.until - clock.t == pytest.approx(60 * 1.5)


@pytest.mark.parametrize("kwargs", [{"max_failures": 0}, {"min_penalty": 0}, {"min_penalty": 5, "max_penalty": 1}, {"jitter": 1.0}])
def test_breaker_policy_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**kwargs)


def test_retry_budget_allows_ratio_plus_floor_within_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock)
    for _ in range(1000):
        budget.deposit()
    allowed = sum(budget.withdraw() for _ in range(1000))
    assert allowed == 200 + 100  # 20% of 1000 plus 10/s over 10 s
    clock.t += 10.01  # the window moved on: everything expired
    assert budget.in_window == (0, 0)
    assert budget.withdraw()
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1)


def test_port_memory_remembers_silent_ports_until_ttl_and_forgets_on_speech() -> None:
    clock = Clock()
    mem = PortMemory(ttl=60, clock=clock)
    dst = ("10.96.0.1", 3306)
    mem.record(dst, conclude(b"", timed_out=True))
    assert mem.is_opaque(dst)
    clock.t += 61
    assert not mem.is_opaque(dst)
    mem.record(dst, Detected(Protocol.OPAQUE, timed_out=True))
    mem.record(dst, conclude(b"GET / HTTP/1.1\r\n", timed_out=False))
    assert not mem.is_opaque(dst)
    assert conclude(b"GE", timed_out=True).protocol is Protocol.OPAQUE  # an ambiguous prefix at the deadline


@pytest.mark.parametrize(("value", "ports"), [("3306", {3306}), ("25, 5432-5434", {25, 5432, 5433, 5434}), ("", set())])
def test_opaque_ports_parse(value: str, ports: set[int]) -> None:
    assert parse_opaque_ports(value) == ports


@pytest.mark.parametrize(("value", "error"), [("mysql", "not a port number"), ("0", "outside"), ("10-5", "outside"), ("1-5000", "more than 1024")])
def test_opaque_ports_bad_values_name_the_item(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_opaque_ports(value)


def test_durations_and_retry_conditions() -> None:
    assert duration("200ms") == pytest.approx(0.2) and duration("1m30s") == 90 and duration("1h") == 3600
    with pytest.raises(ValueError, match="duration"):
        duration("2 seconds")
    assert retry_codes("5xx") == frozenset(range(500, 600))
    assert retry_codes("gateway-error,429") == {429, 502, 503, 504}
    with pytest.raises(ValueError, match="teapot"):
        retry_codes("teapot")


BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, annotations: {config.linkerd.io/opaque-ports: "5432"}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: pg, port: 5432, targetPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: demo}
spec: {clusterIP: 10.96.0.11, selector: {app: web2}, ports: [{port: 80, targetPort: 8080}]}
"""

ROUTE = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: demo, annotations: {retry.linkerd.io/http: 5xx, retry.linkerd.io/limit: "2"}}
spec:
  parentRefs: [{group: core, kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}, method: GET, headers: [{name: X-User, value: "a.*", type: RegularExpression}]}]
      backendRefs: [{name: web, port: 80, weight: 80}, {name: web-v2, port: 80, weight: 20}]
      timeouts: {request: 200ms}
    - backendRefs: [{name: web, port: 80}]
"""


def state_of(text: str) -> ClusterState:
    return ClusterState().apply(parse_documents(text, "test.yaml"))


def test_httproute_flows_into_the_node_config_and_compiles() -> None:
    cfg = node_config(state_of(BASE + ROUTE), "node1", 1)
    assert cfg.extra["opaque_ports"] == [["10.96.0.10", 5432]]
    [entry] = cfg.extra["http_routes"]
    assert entry["parent"] == ["demo", "web", 80]
    table = compile_routes(cfg.extra["http_routes"])
    rule = table.match("demo", "web", 80, b"GET", "/api/users", {b"x-user": b"alice"})
    assert rule is not None and rule.timeout == pytest.approx(0.2) and rule.retry is not None and rule.retry.attempts == 2
    assert 500 in rule.retry.codes and [b.weight for b in rule.backends] == [80, 20]
    picks = [rule.pick_backend(lambda i=i: i / 100).name for i in range(100)]
    assert picks.count("web-v2") == 20
    catch_all = table.match("demo", "web", 80, b"POST", "/api/users", {})
    assert catch_all is not None and catch_all.timeout is None and catch_all is not rule
    assert table.match("demo", "web-v2", 80, b"GET", "/", {}) is None


def test_more_specific_match_wins_over_rule_order() -> None:
    wire = [{"parent": ["demo", "web", 80], "rules": [
        {"route": "demo/a", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backends": []},
        {"route": "demo/b", "matches": [{"path": {"type": "Exact", "value": "/x"}}], "backends": []},
        {"route": "demo/c", "matches": [{"path": {"type": "PathPrefix", "value": "/x/y"}}], "backends": []},
    ]}]
    t = compile_routes(wire)
    assert t.match("demo", "web", 80, b"GET", "/x", {}).route == "demo/b"  # type: ignore[union-attr]
    assert t.match("demo", "web", 80, b"GET", "/x/y/z", {}).route == "demo/c"  # type: ignore[union-attr]
    assert t.match("demo", "web", 80, b"GET", "/q", {}).route == "demo/a"  # type: ignore[union-attr]


def test_a_malformed_wire_route_only_rejects_itself() -> None:
    wire = [
        {"parent": ["demo", "web", 80], "rules": [{"route": "demo/bad", "matches": [{"path": {"type": "Glob", "value": "/"}}], "backends": []}]},
        {"parent": ["demo", "web", 80], "rules": [{"route": "demo/good", "matches": [{}], "backends": []}]},
    ]
    t = compile_routes(wire)
    assert len(t) == 1 and t.match("demo", "web", 80, b"GET", "/", {}).route == "demo/good"  # type: ignore[union-attr]


BAD_ROUTES = [
    ("apiVersion: gateway.networking.k8s.io/v1beta1", "apiVersion", "must be"),
    ("kind: Gateway, name: gw", "spec.parentRefs[0].kind", "only parentRefs of kind Service"),
    ("path: {type: Glob, value: /}", "spec.rules[0].matches[0].path.type", "Exact, PathPrefix or RegularExpression"),
    ("path: {type: PathPrefix, value: api}", "spec.rules[0].matches[0].path.value", "starting with '/'"),
    ("path: {type: RegularExpression, value: '('}", "spec.rules[0].matches[0].path.value", "invalid regular expression"),
    ("method: FETCH", "spec.rules[0].matches[0].method", "must be one of"),
    ("weight: -1", "spec.rules[0].backendRefs[0].weight", "integer 0-1000000"),
    ("request: 2sec", "spec.rules[0].timeouts.request", "Gateway API duration"),
    ("retry: {attempts: 50}", "spec.rules[0].retry.attempts", "1-10"),
    ("retry.linkerd.io/http: sometimes", "metadata.annotations.retry.linkerd.io/http", "not 5xx"),
    ("parent: nosuch", "spec.parentRefs[0]", "does not exist"),
]


def _bad_route(change: str) -> str:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1", "ann": "{}", "pkind": "kind: Service, name: web", "match": "path: {type: PathPrefix, value: /}",
        "weight": "weight: 1", "timeout": "request: 1s", "retry": "",
    }
    if change.startswith("apiVersion"):
        doc["apiVersion"] = change.split(": ")[1]
    elif change.startswith("kind:"):
        doc["pkind"] = change
    elif change.startswith(("path:", "method:")):
        doc["match"] = change
    elif change.startswith("weight"):
        doc["weight"] = change
    elif change.startswith("request"):
        doc["timeout"] = change
    elif change.startswith("retry:"):
        doc["retry"] = change
    elif change.startswith("retry.linkerd.io"):
        doc["ann"] = "{" + change + "}"
    elif change.startswith("parent"):
        doc["pkind"] = "kind: Service, name: nosuch"
    return f"""
---
apiVersion: {doc['apiVersion']}
kind: HTTPRoute
metadata: {{name: r, namespace: demo, annotations: {doc['ann']}}}
spec:
  parentRefs: [{{{doc['pkind']}}}]
  rules:
    - matches: [{{{doc['match']}}}]
      backendRefs: [{{name: web, port: 80, {doc['weight']}}}]
      timeouts: {{{doc['timeout']}}}
      {doc['retry']}
"""


@pytest.mark.parametrize(("change", "field", "message"), BAD_ROUTES, ids=[b[1] + ":" + b[2] for b in BAD_ROUTES])
def test_bad_httproute_is_refused_naming_the_field(change: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        state_of(BASE + _bad_route(change))
    assert field in str(exc.value) and message in str(exc.value), str(exc.value)
    assert "HTTPRoute demo/r" in str(exc.value)


def test_bad_opaque_ports_annotation_is_refused() -> None:
    with pytest.raises(ConfigError, match="opaque-ports"):
        state_of(BASE.replace('"5432"', '"postgres"'))
