"""Route matching: the Cython RouteMatcher (fastpath/route.pyx, what RouteTable.match uses) against
the pure-Python reference (RouteTable.match_reference), the same compiled table and requests run
through both: table-driven cases with the expected rule, then a seeded random corpus."""

from __future__ import annotations

import random

import pytest

from nodemesh.agent.routes import RouteTable, compile_routes

WIRE = [
    {"parent": ["demo", "web", 80], "rules": [
        {"route": "demo/exact", "matches": [{"path": {"type": "Exact", "value": "/login"}}], "backends": []},
        {"route": "demo/api", "matches": [{"path": {"type": "PathPrefix", "value": "/api/"}, "method": "GET"}], "backends": []},
        {"route": "demo/api-v2-user", "matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"},
                                                   "headers": [{"name": "X-User", "value": "a.*", "type": "RegularExpression"}]}], "backends": []},
        {"route": "demo/canary", "matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backends": []},
        {"route": "demo/regex", "matches": [{"path": {"type": "RegularExpression", "value": "/item/[0-9]+"}}], "backends": []},
        {"route": "demo/grpc", "matches": [{"path": {"type": "PathPrefix", "value": "/pkg.Svc"}, "method": "POST"},
                                          {"path": {"type": "Exact", "value": "/pkg.Other/Call"}}], "backends": []},
    ]},
    {"parent": ["demo", "web", 0], "rules": [
        {"route": "demo/any-port", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backends": []},
    ]},
    {"parent": ["demo", "only-80", 80], "rules": [
        {"route": "demo/only", "matches": [{"path": {"type": "PathPrefix", "value": "/x"}}], "backends": []},
    ]},
]

CASES = [
    (("demo", "web", 80, b"GET", "/login", {}), "demo/exact"),
    (("demo", "web", 80, b"GET", "/login/", {}), "demo/any-port"),
    (("demo", "web", 80, b"GET", "/api", {}), "demo/api"),  # prefix /api/ matches /api (trailing / ignored)
    (("demo", "web", 80, b"GET", "/apix", {}), "demo/any-port"),  # ...but not /apix
    (("demo", "web", 80, b"POST", "/api/users", {}), "demo/any-port"),
    (("demo", "web", 80, b"POST", "/api/v2/x", {b"x-user": b"alice"}), "demo/api-v2-user"),
    (("demo", "web", 80, b"POST", "/api/v2/x", {b"x-user": b"bob"}), "demo/any-port"),
    (("demo", "web", 80, b"GET", "/other", {b"x-canary": b"1"}), "demo/canary"),
    (("demo", "web", 80, b"GET", "/other", {b"x-canary": b"2"}), "demo/any-port"),
    (("demo", "web", 80, b"GET", "/item/42", {}), "demo/regex"),
    (("demo", "web", 80, b"GET", "/item/42x", {}), "demo/any-port"),
    (("demo", "web", 80, b"POST", "/pkg.Svc/Method", {}), "demo/grpc"),
    (("demo", "web", 80, b"GET", "/pkg.Other/Call", {}), "demo/grpc"),
    (("demo", "web", 8080, b"GET", "/login", {}), "demo/any-port"),
    (("demo", "only-80", 80, b"GET", "/x/y", {}), "demo/only"),
    (("demo", "only-80", 80, b"GET", "/y", {}), None),
    (("demo", "only-80", 81, b"GET", "/x", {}), None),
    (("other", "web", 80, b"GET", "/", {}), None),
]


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return compile_routes(WIRE)


@pytest.mark.parametrize("impl", ["cython", "python"])
@pytest.mark.parametrize(("request_", "expected"), CASES, ids=[f"{c[0][4]}-{c[1]}" for c in CASES])
def test_route_match(table: RouteTable, impl: str, request_: tuple, expected: str | None) -> None:
    match = table.match if impl == "cython" else table.match_reference
    rule = match(*request_)
    assert (rule.route if rule is not None else None) == expected


def test_cython_and_python_agree_on_a_random_corpus(table: RouteTable) -> None:
    rnd = random.Random(7)
    paths = ["/", "/login", "/login/", "/api", "/api/", "/api/v2", "/api/v2/x", "/apix", "/item/1", "/item/", "/pkg.Svc/M",
             "/pkg.Other/Call", "/x", "/x/", "/xy", "", "/%2F", "/ä"]
    headers = [{}, {b"x-user": b"alice"}, {b"x-user": b"bob"}, {b"x-canary": b"1"}, {b"x-canary": b"1", b"x-user": b"anna"}]
    for _ in range(3000):
        req = (rnd.choice(["demo", "other"]), rnd.choice(["web", "only-80"]), rnd.choice([80, 81, 0]), rnd.choice([b"GET", b"POST", b"PUT"]),
               rnd.choice(paths) + rnd.choice(["", "/z", "9"]), rnd.choice(headers))
        assert table.match(*req) is table.match_reference(*req), req
