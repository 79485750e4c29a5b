"""Sans-IO rules of the h2/gRPC path: gRPC status parsing and classification, the
`retry.linkerd.io/grpc` annotation into the wire form and the compiled RetryPolicy, the request
facts routes see, proxy-made heads, the client preface check and the GOAWAY with a reason."""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, SettingsFrame

from nodemesh import grpc_status
from nodemesh.agent.h2_messages import PREFACE, error_response, goaway, grpc_trailers, is_failure, preface_error, request_info, status_of
from nodemesh.agent.routes import compile_routes
from nodemesh.controller.discovery import node_config
from nodemesh.errors import ConfigError

from .test_l7_rules import BASE, state_of


@pytest.mark.parametrize(("value", "codes"), [
    ("unavailable", {14}),
    ("cancelled,deadline-exceeded, internal,resource-exhausted,unavailable", {1, 4, 13, 8, 14}),
    ("UNAVAILABLE,Resource_Exhausted", {14, 8}),
    ("14,2", {14, 2}),
])
def test_grpc_retry_conditions(value: str, codes: set[int]) -> None:
    assert grpc_status.retry_codes(value) == codes


@pytest.mark.parametrize(("value", "message"), [
    ("ok", "'ok' is not a gRPC status"),
    ("0", "'0' is not a gRPC status"),
    ("17", "'17' is not a gRPC status"),
    ("sometimes", "'sometimes' is not a gRPC status"),
    (" , ", "empty"),
])
def test_bad_grpc_retry_conditions_name_the_item(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grpc_status.retry_codes(value)


@pytest.mark.parametrize(("headers", "code"), [
    ([(b"grpc-status", b"0")], 0),
    ([(b"content-type", b"application/grpc"), (b"grpc-status", b"14")], 14),
    ([(b"grpc-status", b"99")], grpc_status.UNKNOWN),
    ([(b"grpc-status", b"abc")], grpc_status.UNKNOWN),
    ([(b"x", b"0")], None),
])
def test_grpc_status_of_a_header_block(headers: list[tuple[bytes, bytes]], code: int | None) -> None:
    assert grpc_status.status_of(headers) == code


@pytest.mark.parametrize(("status", "code", "failure"), [
    (200, 0, False), (200, 14, True), (200, 5, True), (200, None, False), (503, None, True), (0, None, True), (404, None, False),
])
def test_classification(status: int, code: int | None, failure: bool) -> None:
    assert is_failure(status, code) is failure


def test_request_info_for_routing() -> None:
    info = request_info([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:80"),
                         (b":path", b"/pkg.Svc/Call?x=1"), (b"content-type", b"application/grpc+proto"), (b"x-user", b"a")])
    assert (info.method, info.path, info.authority, info.grpc) == (b"POST", "/pkg.Svc/Call", b"svc:80", True)
    assert info.headers == {b"content-type": b"application/grpc+proto", b"x-user": b"a"}
    assert not request_info([(b":method", b"GET"), (b":path", b"/"), (b"content-type", b"application/grpc-web")]).grpc


def test_proxy_made_heads() -> None:
    grpc = dict(error_response(503, "no endpoints for service demo/x port 80", True))
    assert grpc[b":status"] == b"200" and grpc[b"grpc-status"] == b"14" and grpc[b"l5d-proxy-error"].startswith(b"no endpoints")
    assert dict(error_response(504, "timed out", True, grpc_status.DEADLINE_EXCEEDED))[b"grpc-status"] == b"4"
    plain = dict(error_response(503, "bad\nreason", False))
    assert plain[b":status"] == b"503" and plain[b"l5d-proxy-error"] == b"bad?reason" and b"grpc-status" not in plain
    assert dict(grpc_trailers(4, "100% gone é")) == {b"grpc-status": b"4", b"grpc-message": b"100%25 gone %C3%A9"}
    assert status_of([(b":status", b"204")]) == 204


@pytest.mark.parametrize(("data", "verdict"), [
    (b"", ""),
    (PREFACE[:10], ""),
    (PREFACE, ""),
    (PREFACE + SettingsFrame(0).serialize(), None),
    (PREFACE + SettingsFrame(0, settings={4: 100}).serialize()[:9], None),
    (PREFACE + SettingsFrame(0, flags=["ACK"]).serialize(), "not SETTINGS"),
    (PREFACE + DataFrame(1, data=b"x").serialize(), "frame type 0 on stream 1"),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", "does not start with the HTTP/2 client preface"),
    (b"GET / HTTP/1.1\r\n", "does not start"),
])
def test_client_preface_check(data: bytes, verdict: str | None) -> None:
    got = preface_error(data)
    if verdict is None or verdict == "":
        assert got == verdict
    else:
        assert got is not None and verdict in got


def test_goaway_carries_the_reason() -> None:
    raw = goaway(7, 1, "HTTP/2 protocol error: bad frame")
    f, n = Frame.parse_frame_header(memoryview(raw[:9]))
    f.parse_body(memoryview(raw[9:9 + n]))
    assert isinstance(f, GoAwayFrame) and f.last_stream_id == 7 and f.error_code == 1 and f.additional_data == b"HTTP/2 protocol error: bad frame"


GRPC_ROUTE = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: g, namespace: demo, annotations: {retry.linkerd.io/grpc: "unavailable,internal", retry.linkerd.io/limit: "3"}}
spec:
  parentRefs: [{group: core, kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""


def test_grpc_retry_annotation_flows_into_the_compiled_route() -> None:
    cfg = node_config(state_of(BASE + GRPC_ROUTE), "node1", 1)
    [entry] = [e for e in cfg.extra["http_routes"] if e["rules"][0]["route"] == "demo/g"]
    assert entry["rules"][0]["retry"] == {"codes": [], "attempts": 3, "grpc_codes": [13, 14]}
    rule = compile_routes(cfg.extra["http_routes"]).match("demo", "web", 80, b"POST", "/pkg.Svc/M", {})
    assert rule is not None and rule.retry is not None
    assert rule.retry.grpc_codes == {13, 14} and rule.retry.codes == frozenset() and rule.retry.attempts == 3


def test_bad_grpc_retry_annotation_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as exc:
        state_of(BASE + GRPC_ROUTE.replace("unavailable,internal", "unavailable,flaky"))
    assert "metadata.annotations.retry.linkerd.io/grpc" in str(exc.value) and "'flaky'" in str(exc.value)
