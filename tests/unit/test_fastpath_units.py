"""One table per fastpath unit, run against the Cython unit and its pure-Python reference."""

from __future__ import annotations

import random
import types

import pytest

from nodemesh import fastpath as fast
from nodemesh.fastpath import PROTO_HTTP1, PROTO_HTTP2, PROTO_NEED_MORE, PROTO_OPAQUE, PROTO_TLS
from tests import fastpath_reference as ref

IMPLS = [pytest.param(fast, id="cython"), pytest.param(ref, id="python")]

H2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DETECT_CASES = [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", PROTO_HTTP1),
    (b"POST /x?y=1 HTTP/1.0\r\n", PROTO_HTTP1),
    (b"FOO / HTTP/1.1\r\n", PROTO_HTTP1),  # shape of HTTP/1: llhttp answers 400 for the method
    (b"G", PROTO_NEED_MORE),
    (b"GET /a/b", PROTO_NEED_MORE),
    (b"GET / HTTP/1.1", PROTO_NEED_MORE),
    (b"GET / HTTP/1.1\n", PROTO_OPAQUE),  # bare LF request line
    (b"GET / HTTP/2.0\r\n", PROTO_OPAQUE),
    (b"GET\x00 / HTTP/1.1\r\n", PROTO_OPAQUE),
    (b"GET /\x01 HTTP/1.1\r\n", PROTO_OPAQUE),
    (b" GET / HTTP/1.1\r\n", PROTO_OPAQUE),
    (b"A" * 40, PROTO_OPAQUE),
    (b"GET /" + b"a" * 9000, PROTO_OPAQUE),
    (H2, PROTO_HTTP2),
    (H2 + b"\x00\x00\x00\x04", PROTO_HTTP2),
    (H2[:10], PROTO_NEED_MORE),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", PROTO_OPAQUE),
    (b"\x16\x03\x01\x02\x00\x01", PROTO_TLS),
    (b"\x16\x03", PROTO_NEED_MORE),
    (b"\x16\x07\x01", PROTO_OPAQUE),
    (b"\x00\x00\x00\x01redis", PROTO_OPAQUE),
    (b"*1\r\n$4\r\nPING\r\n", PROTO_OPAQUE),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("data", "expected"), DETECT_CASES)
def test_detect(impl: types.ModuleType, data: bytes, expected: int) -> None:
    assert impl.detect(data) == expected


def test_detect_agrees_with_reference_on_random_prefixes() -> None:
    rnd = random.Random(7)
    seeds = [c[0] for c in DETECT_CASES]
    for _ in range(3000):
        s = rnd.choice(seeds)
        data = bytearray(s[: rnd.randint(1, len(s))])
        if rnd.random() < 0.5 and data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        assert fast.detect(bytes(data)) == ref.detect(bytes(data)), bytes(data)


def _client_hello(sni: str) -> bytes:
    name = sni.encode()
    ext = b"\x00\x00" + (len(name) + 5).to_bytes(2, "big") + (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(ext).to_bytes(2, "big") + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_tls_sni_is_read_from_a_complete_client_hello() -> None:
    hello = _client_hello("hello.demo.svc.cluster.local")
    assert fast.detect(hello) == PROTO_TLS
    assert fast.tls_sni(hello) == "hello.demo.svc.cluster.local"
    assert fast.tls_sni(hello[:-3]) is None  # partial record
    assert fast.tls_sni(b"\x16\x03\x01\x00\x05\x02abcd") is None  # not a ClientHello


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_ewma_takes_peaks_at_once_and_decays(impl: types.ModuleType) -> None:
    e = impl.PeakEwma(30.0, 10.0, 0.0)
    assert e.cost(0.0) == pytest.approx(30.0)
    e.start()
    assert e.cost(0.0) == pytest.approx(60.0)  # one in flight doubles the cost
    e.finish(100.0, 1.0)
    assert e.rtt_ms == pytest.approx(100.0) and e.pending == 0  # a peak replaces the estimate
    e.start()
    e.finish(10.0, 2.0)
    w = 2.718281828459045 ** (-0.1)
    assert e.rtt_ms == pytest.approx(100.0 * w + 10.0 * (1 - w))
    assert e.cost(12.0) == pytest.approx(e.rtt_ms * 2.718281828459045 ** (-1.0))  # idle: drifts cheaper
    with pytest.raises(ValueError, match="decay_s"):
        impl.PeakEwma(30.0, 0.0)


def test_p2c_prefers_the_cheaper_endpoint_and_never_picks_out_of_range() -> None:
    p2c = fast.P2C(42)
    fast_ep, slow_ep = fast.PeakEwma(1.0), fast.PeakEwma(50.0)
    picks = [p2c.pick([fast_ep, slow_ep], 0.0) for _ in range(1000)]
    assert picks.count(1) == 0  # with two endpoints both are always compared
    three = [fast.PeakEwma(5.0) for _ in range(3)]
    seen = {p2c.pick(three, 0.0) for _ in range(300)}
    assert seen == {0, 1, 2}
    assert p2c.pick([fast.PeakEwma()], 0.0) == 0
    with pytest.raises(ValueError, match="no endpoints"):
        p2c.pick([], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_latency_histogram_buckets_are_upper_inclusive(impl: types.ModuleType) -> None:
    h = impl.LatencyHistogram()
    for ms in (0.2, 1.0, 1.5, 50.0, 50.01, 60000.0):
        h.observe(ms)
    cum = dict(h.cumulative())
    assert cum["1"] == 2 and cum["2"] == 3 and cum["50"] == 4 and cum["100"] == 5 and cum["50000"] == 5 and cum["+Inf"] == 6
    assert h.count == 6 and h.sum == pytest.approx(0.2 + 1 + 1.5 + 50 + 50.01 + 60000)


def test_histogram_agrees_with_reference() -> None:
    rnd = random.Random(3)
    a, b = fast.LatencyHistogram(), ref.LatencyHistogram()
    for _ in range(2000):
        ms = rnd.choice([rnd.uniform(0, 10), rnd.uniform(0, 1000), float(rnd.choice(fast.LATENCY_BUCKETS_MS))])
        a.observe(ms)
        b.observe(ms)
    assert a.cumulative() == b.cumulative()


def test_http_stats_counts_by_status_and_classification() -> None:
    s = fast.HttpStats()
    s.request()
    s.request()
    s.response(200, False, 3.0)
    s.response(500, True, 7.0)
    s.response(-1, True, 1.0)
    assert s.requests == 2
    assert sorted(s.responses()) == [(0, True, 1), (200, False, 1), (500, True, 1)]
    assert s.latency.count == 3


HEADS = [
    ([(b"Host", b"a"), (b"X-Id", b"1")], None, False, b"GET / HTTP/1.1\r\nHost: a\r\nX-Id: 1\r\n\r\n"),
    ([(b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"), (b"Keep-Alive", b"5"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Connection", b"x")], None, False, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ([(b"Host", b"a"), (b"Content-Length", b"12")], 12, False, b"GET / HTTP/1.1\r\nHost: a\r\ncontent-length: 12\r\n\r\n"),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked"), (b"Trailer", b"x")], None, True, b"GET / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("headers", "cl", "chunked", "expected"), HEADS)
def test_request_head_drops_hop_by_hop_and_reframes(impl: types.ModuleType, headers: list, cl: int | None, chunked: bool, expected: bytes) -> None:
    assert impl.encode_request_head(b"GET", b"/", headers, cl, chunked) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_response_head(impl: types.ModuleType) -> None:
    out = impl.encode_response_head(503, b"Service Unavailable", [(b"Connection", b"close"), (b"l5d-proxy-error", b"no endpoints")], 0, False, True)
    assert out == b"HTTP/1.1 503 Service Unavailable\r\nl5d-proxy-error: no endpoints\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
