"""Pure-Python references of the fastpath units, kept only as test oracles: the unit tests run one
table against both implementations (httptools/uvloop style), and bench/ measures the speedup."""

from __future__ import annotations

import math
import re

from nodemesh.fastpath import LATENCY_BUCKETS_MS, PROTO_HTTP1, PROTO_HTTP2, PROTO_NEED_MORE, PROTO_OPAQUE, PROTO_TLS

_H2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TCHAR = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]*")


def detect(data: bytes) -> int:
    if not data:
        return PROTO_NEED_MORE
    m = min(len(data), len(_H2))
    if data[:m] == _H2[:m]:
        return PROTO_NEED_MORE if m < len(_H2) else PROTO_HTTP2
    if data[0] == 0x16:
        if len(data) < 3:
            return PROTO_NEED_MORE
        return PROTO_TLS if data[1] == 3 and data[2] <= 4 else PROTO_OPAQUE
    tok = _TCHAR.match(data[:33]).group(0)  # type: ignore[union-attr]
    if len(tok) == len(data) and len(tok) <= 32:
        return PROTO_NEED_MORE
    if not tok or len(tok) > 32 or data[len(tok)] != 0x20:
        return PROTO_OPAQUE
    sp1 = len(tok)
    eol = data.find(b"\n", sp1 + 1)
    rest = data[sp1 + 1 : eol if eol >= 0 else len(data)]
    if any(c < 0x20 and c not in (0x0D, 0x09) for c in rest):
        return PROTO_OPAQUE
    if eol < 0:
        return PROTO_NEED_MORE if len(data) < 8192 else PROTO_OPAQUE
    if eol < sp1 + 11 or data[eol - 1] != 0x0D:
        return PROTO_OPAQUE
    if data[eol - 10 : eol - 2] == b" HTTP/1." and 0x30 <= data[eol - 2] <= 0x39:
        return PROTO_HTTP1
    return PROTO_OPAQUE


class PeakEwma:
    def __init__(self, default_rtt_ms: float = 30.0, decay_s: float = 10.0, now: float = 0.0) -> None:
        if decay_s <= 0:
            raise ValueError(f"decay_s must be > 0, got {decay_s}")
        self.rtt_ms, self.stamp, self.pending, self.decay_s = default_rtt_ms, now, 0, decay_s

    def cost(self, now: float) -> float:
        elapsed = now - self.stamp
        rtt = self.rtt_ms * math.exp(-elapsed / self.decay_s) if elapsed > 0 else self.rtt_ms
        return rtt * (self.pending + 1)

    def start(self) -> None:
        self.pending += 1

    def finish(self, rtt_ms: float, now: float) -> None:
        if self.pending > 0:
            self.pending -= 1
        if rtt_ms > self.rtt_ms:
            self.rtt_ms = rtt_ms
        else:
            elapsed = now - self.stamp
            w = math.exp(-elapsed / self.decay_s) if elapsed > 0 else 1.0
            self.rtt_ms = self.rtt_ms * w + rtt_ms * (1.0 - w)
        self.stamp = max(self.stamp, now)


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, ms: float) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b), len(LATENCY_BUCKETS_MS))
        self.counts[i] += 1
        self.sum += ms
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(LATENCY_BUCKETS_MS, self.counts):
            acc += c
            out.append((str(int(b)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length"}


def _fields(headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool) -> bytes:
    listed = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",") if t.strip()}
    out = b"".join(n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in _HOP and n.lower() not in listed)
    if chunked:
        out += b"transfer-encoding: chunked\r\n"
    elif content_length is not None:
        out += b"content-length: %d\r\n" % content_length
    return out


def encode_request_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool) -> bytes:
    return method + b" " + url + b" HTTP/1.1\r\n" + _fields(headers, content_length, chunked) + b"\r\n"


def encode_response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool, close: bool) -> bytes:
    return b"HTTP/1.1 %d " % status + reason + b"\r\n" + _fields(headers, content_length, chunked) + (b"connection: close\r\n" if close else b"") + b"\r\n"
