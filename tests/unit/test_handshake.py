"""The node-to-node tunnel handshake, sans-IO: table-driven, every case also fed byte by byte."""

from __future__ import annotations

import pytest

from nodemesh.agent.handshake import (
    MAX_HEAD,
    HandshakeError,
    RequestParser,
    ResponseParser,
    TunnelRequest,
    TunnelResponse,
    encode_request,
    encode_response,
)
from nodemesh.errors import ProtocolError

SRC = "spiffe://cluster.local/ns/default/sa/client"


def feed_all(parser, data: bytes, step: int | None):
    """Feed in chunks of `step` (None = all at once); return the first result and what followed."""
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            head, leftover = result
            return head, leftover + b"".join(chunks[i + 1 :])
    return None


STEPS = [None, 1, 2, 7]

REQUESTS = [
    # (wire bytes, expected TunnelRequest)
    (
        f"CONNECT 10.244.2.7:8080 NMTUN/1\r\nx-nodemesh-src: {SRC}\r\nx-nodemesh-dst-pod: default/web-1\r\n\r\n".encode(),
        TunnelRequest("10.244.2.7", 8080, SRC, "default/web-1"),
    ),
    (b"CONNECT 10.0.0.1:1 NMTUN/1\r\n\r\n", TunnelRequest("10.0.0.1", 1, None, None)),
    (b"CONNECT 10.0.0.1:65535 NMTUN/1\r\nX-NodeMesh-Src:   spiffe://x  \r\n\r\n", TunnelRequest("10.0.0.1", 65535, "spiffe://x", None)),
    (b"CONNECT [fd00::1]:80 NMTUN/1\r\nx-other: ignored\r\n\r\n", TunnelRequest("fd00::1", 80, None, None)),
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("wire,expected", REQUESTS)
def test_request_parses(wire: bytes, expected: TunnelRequest, step: int | None) -> None:
    assert feed_all(RequestParser(), wire + b"PAYLOAD\r\n\r\nmore", step) == (expected, b"PAYLOAD\r\n\r\nmore")


@pytest.mark.parametrize("req", [r for _, r in REQUESTS])
def test_request_roundtrip(req: TunnelRequest) -> None:
    assert RequestParser().feed(encode_request(req)) == (req, b"")


def test_encoded_request_is_connect_shaped() -> None:
    wire = encode_request(TunnelRequest("10.244.2.7", 8080, SRC, "default/web-1"))
    assert wire == f"CONNECT 10.244.2.7:8080 NMTUN/1\r\nx-nodemesh-src: {SRC}\r\nx-nodemesh-dst-pod: default/web-1\r\n\r\n".encode()


@pytest.mark.parametrize("step", STEPS)
def test_incomplete_request_waits(step: int | None) -> None:
    wire = b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-nodemesh-src: a\r\n\r"
    assert feed_all(RequestParser(), wire, step) is None


BAD_REQUESTS = [
    # (wire, status hint, words expected in the message)
    (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 400, "CONNECT"),
    (b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n", 400, "CONNECT"),
    (b"CONNECT 10.0.0.1:80\r\n\r\n", 400, "CONNECT"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "non-ASCII"),
    (b"CONNECT 10.0.0.1:0 NMTUN/1\r\n\r\n", 400, "port"),
    (b"CONNECT 10.0.0.1:65536 NMTUN/1\r\n\r\n", 400, "port"),
    (b"CONNECT 10.0.0.1:-1 NMTUN/1\r\n\r\n", 400, "port"),
    (b"CONNECT 10.0.0.1:80a NMTUN/1\r\n\r\n", 400, "port"),
    (b"CONNECT 10.0.0.1 NMTUN/1\r\n\r\n", 400, "ip:port"),
    (b"CONNECT 10.0.0.256:80 NMTUN/1\r\n\r\n", 400, "not an IP"),
    (b"CONNECT web.default:80 NMTUN/1\r\n\r\n", 400, "not an IP"),
    (b"CONNECT 010.0.0.1:80 NMTUN/1\r\n\r\n", 400, "IP"),
    (b"CONNECT fd00::1:80 NMTUN/1\r\n\r\n", 400, "ip:port"),
    (b"CONNECT 10.0.0.1:80 NMTUN/1\r\nno colon here\r\n\r\n", 400, "malformed header"),
    (b"CONNECT 10.0.0.1:80 NMTUN/1\r\n folded: x\r\n\r\n", 400, "malformed header"),
    (b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-nodemesh-src: a\x01b\r\n\r\n", 400, "control"),
    (b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-nodemesh-src: a\r\nX-Nodemesh-Src: b\r\n\r\n", 400, "twice"),
]


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("wire,status,words", BAD_REQUESTS)
def test_bad_request_raises(wire: bytes, status: int, words: str, step: int | None) -> None:
    with pytest.raises(HandshakeError, match=words) as info:
        feed_all(RequestParser(), wire, step)
    assert info.value.status == status
    assert isinstance(info.value, ProtocolError)  # callers may catch the shared protocol error


@pytest.mark.parametrize("step", [None, 1, 1000])
def test_oversize_head_without_terminator(step: int | None) -> None:
    wire = b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-pad: " + b"a" * MAX_HEAD
    with pytest.raises(HandshakeError, match="limit") as info:
        feed_all(RequestParser(), wire, step)
    assert info.value.status == 431


def test_oversize_head_with_terminator_in_one_feed() -> None:
    wire = b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(HandshakeError, match="limit"):
        RequestParser().feed(wire)


def test_head_at_limit_is_accepted_and_big_leftover_kept() -> None:
    base = b"CONNECT 10.0.0.1:80 NMTUN/1\r\nx-pad: \r\n\r\n"
    wire = base.replace(b"x-pad: ", b"x-pad: " + b"a" * (MAX_HEAD - len(base)))
    assert len(wire) == MAX_HEAD
    payload = b"z" * (3 * MAX_HEAD)
    req, leftover = RequestParser().feed(wire + payload)
    assert req.dst_port == 80 and leftover == payload


def test_custom_limit() -> None:
    with pytest.raises(HandshakeError):
        RequestParser(max_head=16).feed(b"CONNECT 10.0.0.1:80 NMTUN/1\r\n\r\n")


def test_parser_is_single_use() -> None:
    p = RequestParser()
    assert p.feed(b"CONNECT 10.0.0.1:80 NMTUN/1\r\n\r\n") is not None
    with pytest.raises(RuntimeError):
        p.feed(b"more")


RESPONSES = [
    (b"NMTUN/1 200 OK\r\n\r\n", TunnelResponse(200, "OK")),
    (b"NMTUN/1 404 Unknown Pod\r\n\r\n", TunnelResponse(404, "Unknown Pod")),
    (b"NMTUN/1 502 cannot connect to 10.0.0.1:80: Connection refused\r\n\r\n", TunnelResponse(502, "cannot connect to 10.0.0.1:80: Connection refused")),
    (b"NMTUN/1 400 \r\nx-detail: whatever\r\n\r\n", TunnelResponse(400, "")),
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("wire,expected", RESPONSES)
def test_response_parses(wire: bytes, expected: TunnelResponse, step: int | None) -> None:
    assert feed_all(ResponseParser(), wire + b"SSH-2.0-banner\r\n", step) == (expected, b"SSH-2.0-banner\r\n")


@pytest.mark.parametrize(
    "status,reason,wire",
    [
        (200, None, b"NMTUN/1 200 OK\r\n\r\n"),
        (404, None, b"NMTUN/1 404 Unknown Pod\r\n\r\n"),
        (502, None, b"NMTUN/1 502 Connect Failed\r\n\r\n"),
        (400, None, b"NMTUN/1 400 Bad Request\r\n\r\n"),
        (502, "refused\r\n\r\nsmuggled", b"NMTUN/1 502 refused    smuggled\r\n\r\n"),
    ],
)
def test_encode_response(status: int, reason: str | None, wire: bytes) -> None:
    assert encode_response(status, reason) == wire
    resp, leftover = ResponseParser().feed(wire)
    assert resp.status == status and leftover == b""


BAD_RESPONSES = [
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"NMTUN/1 20 OK\r\n\r\n",
    b"NMTUN/1 2000 OK\r\n\r\n",
    b"NMTUN/1 OK\r\n\r\n",
    b"NMTUN/1 200 OK\r\nbroken header\r\n\r\n",
    b"\x00\x01\x02\xff\r\n\r\n",
]


@pytest.mark.parametrize("wire", BAD_RESPONSES)
def test_bad_response_raises(wire: bytes) -> None:
    with pytest.raises(HandshakeError):
        feed_all(ResponseParser(), wire, 1)


@pytest.mark.parametrize(
    "req,words",
    [
        (TunnelRequest("10.0.0.1", 0), "port"),
        (TunnelRequest("10.0.0.1", 70000), "port"),
        (TunnelRequest("not-an-ip", 80), "not an IP"),
        (TunnelRequest("10.0.0.1", 80, "spiffe://a\r\nx-evil: 1"), "characters"),
        (TunnelRequest("10.0.0.1", 80, "x" * MAX_HEAD), "limit"),
    ],
)
def test_encode_request_refuses(req: TunnelRequest, words: str) -> None:
    with pytest.raises(HandshakeError, match=words):
        encode_request(req)
