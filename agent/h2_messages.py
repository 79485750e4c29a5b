"""HTTP/2 messages at the proxy, sans-IO: what a request head says (for routing), the header blocks
the proxy writes itself (errors, gRPC trailers-only answers), a GOAWAY with a reason, and the
classification of a finished exchange. agent/h2_proxy.py does the I/O around these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hyperframe.frame import GoAwayFrame

from nodemesh import grpc_status

ERROR_HEADER = b"l5d-proxy-error"  # the same header the HTTP/1 path answers its own errors with
Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True)
class RequestInfo:
    method: bytes
    path: str  # :path without the query, what route matches see
    authority: bytes
    grpc: bool  # content-type application/grpc[+proto|...]: errors become gRPC statuses
    headers: dict[bytes, bytes]  # regular headers (lowercase, h2 guarantees it), for header matches


def request_info(headers: Headers) -> RequestInfo:
    """Route-relevant facts of a request head h2 already validated (pseudo-headers present once)."""
    method = authority = b""
    raw_path = b"/"
    regular: dict[bytes, bytes] = {}
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            raw_path = value
        elif name == b":authority":
            authority = value
        elif not name.startswith(b":"):
            regular[name] = value
    ctype = regular.get(b"content-type", b"")
    grpc = ctype == b"application/grpc" or ctype.startswith((b"application/grpc+", b"application/grpc;"))
    return RequestInfo(method, raw_path.split(b"?", 1)[0].decode("latin-1"), authority, grpc, regular)


def status_of(headers: Headers) -> int:
    """:status of a response head (h2 validated it is there and numeric)."""
    for name, value in headers:
        if name == b":status":
            return int(value)
    raise ValueError("response head without :status")


def error_response(status: int, reason: str, grpc: bool, grpc_code: int | None = None) -> list[tuple[bytes, bytes]]:
    """A head the proxy answers with and ends the stream on. gRPC callers get a trailers-only
    response (HTTP 200 with grpc-status), which every gRPC client reads as that status."""
    why = _header_value(reason)
    if not grpc:
        return [(b":status", str(status).encode()), (b"content-length", b"0"), (ERROR_HEADER, why)]
    code = grpc_code if grpc_code is not None else grpc_status.for_http_status(status)
    return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", str(code).encode()),
            (b"grpc-message", _grpc_message(reason)), (ERROR_HEADER, why)]


def grpc_trailers(code: int, reason: str) -> list[tuple[bytes, bytes]]:
    """Trailers that end a gRPC response the proxy has to cut short after its head went out."""
    return [(b"grpc-status", str(code).encode()), (b"grpc-message", _grpc_message(reason))]


def _header_value(text: str) -> bytes:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:512].encode()


def _grpc_message(text: str) -> bytes:
    # grpc-message is percent-encoded UTF-8 (PROTOCOL-HTTP2.md): keep printable ASCII but '%'
    out = bytearray()
    for b in text.encode()[:512]:
        out += bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
    return bytes(out)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS = 0x4


def preface_error(data: bytes) -> str | None:
    """Why the start of a client connection is not a valid preface (RFC 9113 3.4: the fixed string,
    then a SETTINGS frame on stream 0 that is not an ACK), "" while too short to tell, None if valid.
    h2 itself does not insist on the SETTINGS frame."""
    if data[:len(PREFACE)] != PREFACE[:len(data)]:
        return "the connection does not start with the HTTP/2 client preface"
    need = len(PREFACE) + 9
    if len(data) < need:
        return ""
    ftype, flags = data[len(PREFACE) + 3], data[len(PREFACE) + 4]
    stream = int.from_bytes(data[len(PREFACE) + 5:need], "big") & 0x7FFFFFFF
    if ftype != _SETTINGS or stream != 0 or flags & 0x1:
        return f"the client preface is followed by frame type {ftype} on stream {stream}, not SETTINGS"
    return None


def goaway(last_stream_id: int, error_code: int, reason: str) -> bytes:
    """A GOAWAY frame whose debug data says why (h2's own carries none)."""
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code, additional_data=reason.encode()[:1024]).serialize()


def is_failure(status: int, grpc_code: int | None) -> bool:
    """Linkerd's classification: a gRPC status decides when present, else 5xx (or none) fails."""
    if grpc_code is not None:
        return grpc_status.is_failure(grpc_code)
    return status >= 500 or status == 0
