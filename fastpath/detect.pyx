# Protocol detection from a connection's first bytes, sans-IO. The caller peeks what the client sent
# and calls detect() again with more bytes while it answers NEED_MORE (bounded by a short deadline
# in agent/detect.py, so server-speaks-first protocols do not stall on us).

cdef Py_ssize_t _H2_PREFACE_LEN = 24
cdef bytes _H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
cdef Py_ssize_t MAX_REQUEST_LINE = 8192  # past this without CRLF it is no HTTP/1 we will parse

PROTO_NEED_MORE = 0
PROTO_HTTP1 = 1
PROTO_HTTP2 = 2
PROTO_TLS = 3
PROTO_OPAQUE = 4


cdef inline bint _is_tchar(unsigned char c):
    # RFC 9110 token characters
    if (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or (c >= b'0' and c <= b'9'):
        return True
    return c in b"!#$%&'*+-.^_`|~"


cpdef int detect(bytes data):
    """PROTO_* for `data`, the first bytes a client sent (never empty)."""
    cdef const unsigned char* p = data
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t i, sp1, eol
    if n == 0:
        return 0
    # HTTP/2 prior knowledge (gRPC without TLS): the fixed client preface
    cdef Py_ssize_t m = n if n < _H2_PREFACE_LEN else _H2_PREFACE_LEN
    if data[:m] == _H2_PREFACE[:m]:
        return 0 if m < _H2_PREFACE_LEN else 2
    # TLS record: handshake (22), major version 3
    if p[0] == 0x16:
        if n < 3:
            return 0
        return 3 if p[1] == 3 and p[2] <= 4 else 4
    # HTTP/1.x request line: token SP target SP "HTTP/1." digit CRLF
    i = 0
    while i < n and i <= 32 and _is_tchar(p[i]):
        i += 1
    if i == n:
        return 0 if i <= 32 else 4
    if i == 0 or i > 32 or p[i] != b' ':
        return 4
    sp1 = i
    eol = -1
    i = sp1 + 1
    while i < n:
        if p[i] == b'\n':
            eol = i
            break
        if p[i] < 0x20 and p[i] != b'\r' and p[i] != b'\t':
            return 4
        i += 1
    if eol < 0:
        return 0 if n < MAX_REQUEST_LINE else 4
    # line ends "... HTTP/1.x\r\n"
    if eol < sp1 + 11 or p[eol - 1] != b'\r':
        return 4
    if data[eol - 10:eol - 2] == b" HTTP/1." and p[eol - 2] >= b'0' and p[eol - 2] <= b'9':
        return 1
    return 4


cpdef object tls_sni(bytes data):
    """The server name from a complete TLS ClientHello record in `data`, or None (absent/partial)."""
    cdef const unsigned char* p = data
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t rec_len, end, i, l, ext_end, etype, elen, list_end, nlen
    if n < 9 or p[0] != 0x16 or p[5] != 0x01:
        return None
    rec_len = (p[3] << 8) | p[4]
    end = 5 + rec_len
    if end > n:
        return None
    i = 5 + 4 + 2 + 32  # handshake header, client_version, random
    if i + 1 > end:
        return None
    i += 1 + p[i]  # session id
    if i + 2 > end:
        return None
    i += 2 + ((p[i] << 8) | p[i + 1])  # cipher suites
    if i + 1 > end:
        return None
    i += 1 + p[i]  # compression methods
    if i + 2 > end:
        return None
    ext_end = i + 2 + ((p[i] << 8) | p[i + 1])
    i += 2
    if ext_end > end:
        return None
    while i + 4 <= ext_end:
        etype = (p[i] << 8) | p[i + 1]
        elen = (p[i + 2] << 8) | p[i + 3]
        i += 4
        if i + elen > ext_end:
            return None
        if etype == 0 and elen >= 5:  # server_name: list len, type 0 (host_name), name len, name
            list_end = i + 2 + ((p[i] << 8) | p[i + 1])
            if p[i + 2] != 0 or list_end > i + elen:
                return None
            nlen = (p[i + 3] << 8) | p[i + 4]
            if i + 5 + nlen > list_end:
                return None
            return data[i + 5:i + 5 + nlen].decode("ascii", "replace")
        i += elen
    return None
