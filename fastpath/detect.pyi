PROTO_NEED_MORE: int
PROTO_HTTP1: int
PROTO_HTTP2: int
PROTO_TLS: int
PROTO_OPAQUE: int

def detect(data: bytes) -> int:
    """PROTO_* for the first bytes a client sent: HTTP/1.x request line, HTTP/2 preface, TLS
    ClientHello record header, opaque, or NEED_MORE (a prefix of one of those)."""

def tls_sni(data: bytes) -> str | None:
    """The SNI host name of a complete ClientHello record, or None."""
