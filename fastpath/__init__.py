"""Cython hot paths of the node proxy, built as one extension module (see DESIGN.md, Packaging)."""

from nodemesh.fastpath._fast import (
    LAST_CHUNK,
    LATENCY_BUCKETS_MS,
    MAX_HEAD_BYTES,
    PROTO_HTTP1,
    PROTO_HTTP2,
    PROTO_NEED_MORE,
    PROTO_OPAQUE,
    PROTO_TLS,
    P2C,
    Head,
    Http1Error,
    Http1Reader,
    HttpStats,
    LatencyHistogram,
    PeakEwma,
    RouteMatcher,
    TcpStats,
    detect,
    encode_chunk,
    encode_request_head,
    encode_response_head,
    tls_sni,
)

__all__ = [
    "LAST_CHUNK", "LATENCY_BUCKETS_MS", "MAX_HEAD_BYTES", "PROTO_HTTP1", "PROTO_HTTP2", "PROTO_NEED_MORE", "PROTO_OPAQUE",
    "PROTO_TLS", "P2C", "Head", "Http1Error", "Http1Reader", "HttpStats", "LatencyHistogram", "PeakEwma", "RouteMatcher", "TcpStats",
    "detect", "encode_chunk", "encode_request_head", "encode_response_head", "tls_sni",
]
