"""The node-to-node tunnel handshake, sans-IO (h11's shape: bytes in, events out, no sockets).

HTTP CONNECT-shaped so the mTLS work can carry the same fields in an HTTP/2 CONNECT (HBONE-style):

    CONNECT 10.244.2.7:8080 NMTUN/1\\r\\n
    x-nodemesh-src: spiffe://cluster.local/ns/default/sa/client\\r\\n
    x-nodemesh-dst-pod: default/server-7d9\\r\\n
    \\r\\n

    NMTUN/1 200 OK\\r\\n\\r\\n                     (or 404 unknown pod, 502 connect failed, 400 ...)

Everything after the blank line belongs to the relayed stream; parsers hand it back as `leftover`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nodemesh.errors import ProtocolError

PROTOCOL = "NMTUN/1"
MAX_HEAD = 8 * 1024
HDR_SRC = "x-nodemesh-src"
HDR_DST_POD = "x-nodemesh-dst-pod"

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Unknown Pod",
    502: "Connect Failed",
    503: "Unavailable",
    504: "Connect Timeout",
}

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$|^$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_STATUS_LINE = re.compile(r"^NMTUN/1 ([1-5][0-9]{2}) ([\x20-\x7e]*)$")
_TERMINATOR = b"\r\n\r\n"


class HandshakeError(ProtocolError):
    """A malformed or oversize handshake. `status` is the response code to answer with (h11's
    error_status_hint), so the inbound side can reply before closing."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TunnelRequest:
    dst_ip: str
    dst_port: int
    src_identity: str | None = None  # SPIFFE ID of the source workload; None for unmeshed sources
    dst_pod: str | None = None  # "namespace/name" of the target pod, for the inbound side's checks

    @property
    def authority(self) -> str:
        host = f"[{self.dst_ip}]" if ":" in self.dst_ip else self.dst_ip
        return f"{host}:{self.dst_port}"


@dataclass(frozen=True)
class TunnelResponse:
    status: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def encode_request(req: TunnelRequest) -> bytes:
    _check_ip(req.dst_ip)
    if not 0 < req.dst_port < 65536:
        raise HandshakeError(f"port {req.dst_port} is out of range 1..65535")
    lines = [f"CONNECT {req.authority} {PROTOCOL}"]
    for name, value in ((HDR_SRC, req.src_identity), (HDR_DST_POD, req.dst_pod)):
        if value is not None:
            if not _VALUE.match(value):
                raise HandshakeError(f"header {name} has characters a handshake cannot carry: {value!r}")
            lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    if len(head) > MAX_HEAD:
        raise HandshakeError(f"handshake of {len(head)} bytes exceeds the {MAX_HEAD}-byte limit")
    return head


def encode_response(status: int, reason: str | None = None) -> bytes:
    if not 100 <= status <= 599:
        raise ValueError(f"status {status} is not a 3-digit HTTP-style code")
    text = REASONS.get(status, "Error") if reason is None else reason
    # The reason is free text from our own error messages: keep it on one printable line.
    text = re.sub(r"[^\x20-\x7e]", " ", text)[:200]
    return f"{PROTOCOL} {status} {text}\r\n\r\n".encode("ascii")


class _HeadParser:
    """Accumulates bytes until the blank line; then the head is parsed once and the rest is leftover."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._buf = bytearray()
        self._max = max_head
        self._done = False

    def take(self, data: bytes) -> tuple[list[str], bytes] | None:
        if self._done:
            raise RuntimeError("handshake already parsed; relay the leftover bytes instead")
        # Search only the new bytes plus 3 of the old, so byte-by-byte feeds stay linear.
        start = max(0, len(self._buf) - 3)
        self._buf += data
        end = self._buf.find(_TERMINATOR, start)
        if end < 0:
            if len(self._buf) > self._max:
                raise HandshakeError(f"handshake exceeds the {self._max}-byte limit", status=431)
            return None
        if end + 4 > self._max:
            raise HandshakeError(f"handshake exceeds the {self._max}-byte limit", status=431)
        self._done = True
        head, leftover = bytes(self._buf[:end]), bytes(self._buf[end + 4 :])
        self._buf = bytearray()
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise HandshakeError("handshake contains non-ASCII bytes") from None
        return text.split("\r\n"), leftover


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HandshakeError(f"malformed header line {line[:80]!r}")
        value = value.strip(" \t")
        if not _VALUE.match(value):
            raise HandshakeError(f"header {name} has a control character")
        key = name.lower()
        if key in headers:
            # Two different answers for one field is how smuggling starts; refuse instead of picking.
            raise HandshakeError(f"header {name} appears twice")
        headers[key] = value
    return headers


def _check_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise HandshakeError(f"{ip!r} is not an IP address") from None


def _parse_authority(authority: str) -> tuple[str, int]:
    if authority.startswith("["):
        host, sep, port = authority[1:].partition("]:")
        if not sep or ":" not in host:
            raise HandshakeError(f"malformed target {authority!r}")
    else:
        host, sep, port = authority.rpartition(":")
        if not sep or ":" in host:
            raise HandshakeError(f"target {authority!r} must be ip:port")
    if not _PORT.match(port) or not 0 < int(port) < 65536:
        raise HandshakeError(f"target port {port!r} is not in 1..65535")
    ip = _check_ip(host)
    if ip != host:  # non-canonical spellings (leading zeros, ...) are refused, not reinterpreted
        raise HandshakeError(f"target {host!r} is not a canonical IP address")
    return ip, int(port)


class RequestParser:
    """Inbound side: `feed(bytes)` until it returns `(TunnelRequest, leftover)`; raises HandshakeError."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._head = _HeadParser(max_head)

    def feed(self, data: bytes) -> tuple[TunnelRequest, bytes] | None:
        taken = self._head.take(data)
        if taken is None:
            return None
        lines, leftover = taken
        method, _, rest = lines[0].partition(" ")
        authority, _, proto = rest.partition(" ")
        if method != "CONNECT" or proto != PROTOCOL or not authority:
            raise HandshakeError(f"expected 'CONNECT <ip>:<port> {PROTOCOL}', got {lines[0][:80]!r}")
        ip, port = _parse_authority(authority)
        headers = _parse_headers(lines[1:])
        return TunnelRequest(ip, port, headers.get(HDR_SRC), headers.get(HDR_DST_POD)), leftover


class ResponseParser:
    """Outbound side: `feed(bytes)` until it returns `(TunnelResponse, leftover)`; raises HandshakeError."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._head = _HeadParser(max_head)

    def feed(self, data: bytes) -> tuple[TunnelResponse, bytes] | None:
        taken = self._head.take(data)
        if taken is None:
            return None
        lines, leftover = taken
        m = _STATUS_LINE.match(lines[0])
        if not m:
            raise HandshakeError(f"expected '{PROTOCOL} <code> <reason>', got {lines[0][:80]!r}")
        _parse_headers(lines[1:])  # none defined yet; still validated so garbage is not accepted
        return TunnelResponse(int(m.group(1)), m.group(2)), leftover
