# HTTP/1.1 message handling for the proxy, sans-IO: the callback target httptools (llhttp, strict
# mode) drives while parsing, with the checks llhttp leaves to us (head size, duplicate Host,
# Transfer-Encoding in HTTP/1.0), and the encoders that re-frame a message for the next hop with
# hop-by-hop headers removed. llhttp itself rejects conflicting/duplicate Content-Length, CL with TE,
# TE other than a final "chunked", bad chunk sizes, bad header names, obs-fold, bare CR/LF.

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; past it: 400 and close

# RFC 9110 7.6.1 hop-by-hop fields, plus proxy-connection (non-standard but widely sent)
cdef frozenset _HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                                 b"transfer-encoding", b"upgrade", b"content-length"))
# content-length is not hop-by-hop, but the proxy always writes its own framing header


class Http1Error(Exception):
    """A message the proxy refuses: `status` is what the client gets (400, 502 for an upstream), then close."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


cdef class Head:
    """One parsed request or response head."""
    cdef public bytes method
    cdef public bytes url
    cdef public int status
    cdef public bytes reason
    cdef public str version
    cdef public list headers  # [(name, value)] as received, names in original case
    cdef public object content_length  # int or None
    cdef public bint chunked
    cdef public bint keep_alive
    cdef public bytes host

    cpdef bytes get(self, bytes lname):
        """The first value of header `lname` (lowercase), or None."""
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None


cdef class Http1Reader:
    """httptools callback target. `sink` gets on_head(Head), on_body(bytes), on_end(); an error
    found in a callback is kept in `error` (never unwound through llhttp) and the caller raises it
    after feed_data."""
    cdef public object parser
    cdef public object error
    cdef object sink
    cdef bint is_request
    cdef list headers
    cdef list url
    cdef bytes reason
    cdef Py_ssize_t head_bytes
    cdef Py_ssize_t max_head
    cdef int n_host
    cdef bint te_seen
    cdef public bint in_message
    cdef public bint head_done

    def __cinit__(self, object sink, bint is_request, Py_ssize_t max_head=MAX_HEAD_BYTES):
        self.sink = sink
        self.is_request = is_request
        self.max_head = max_head
        self.error = None
        self._reset()

    cdef void _reset(self):
        self.headers = []
        self.url = []
        self.reason = b""
        self.head_bytes = 0
        self.n_host = 0
        self.te_seen = False
        self.in_message = False
        self.head_done = False

    cdef void _fail(self, int status, str reason):
        if self.error is None:
            self.error = Http1Error(status, reason)

    cdef bint _grow(self, Py_ssize_t n):
        self.head_bytes += n
        if self.head_bytes > self.max_head:
            self._fail(400 if self.is_request else 502, f"message head over {self.max_head} bytes")
            return False
        return True

    def on_message_begin(self):
        self._reset()
        self.in_message = True

    def on_url(self, bytes url):
        if self._grow(len(url)):
            self.url.append(url)

    def on_status(self, bytes reason):
        if self._grow(len(reason)):
            self.reason = self.reason + reason

    def on_header(self, bytes name, bytes value):
        cdef bytes lname
        if not self._grow(len(name) + len(value) + 4):
            return
        lname = name.lower()
        if lname == b"host":
            self.n_host += 1
        elif lname == b"transfer-encoding":
            self.te_seen = True
        self.headers.append((name, value))

    def on_headers_complete(self):
        cdef Head h = Head()
        p = self.parser
        h.version = p.get_http_version()
        h.headers = self.headers
        h.keep_alive = p.should_keep_alive()
        h.chunked = self.te_seen  # llhttp accepted it, so it ends in "chunked"
        h.content_length = None
        h.status = 0
        h.reason = self.reason
        h.host = None
        if self.is_request:
            h.method = p.get_method()
            h.url = b"".join(self.url)
            if self.n_host > 1:
                self._fail(400, "more than one Host header")
            elif self.n_host == 0 and h.version == "1.1":
                self._fail(400, "HTTP/1.1 request without a Host header")
            if self.te_seen and h.version == "1.0":
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
        else:
            h.method = b""
            h.url = b""
            h.status = p.get_status_code()
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                h.content_length = int(value)  # llhttp checked digits and duplicates
            elif lname == b"host":
                h.host = value
        if self.error is not None:
            return
        self.head_done = True
        self.sink.on_head(h)

    def on_body(self, bytes body):
        if self.error is None:
            self.sink.on_body(body)

    def on_message_complete(self):
        self.in_message = False
        if self.error is None:
            self.sink.on_end()


cdef set _connection_tokens(list headers):
    cdef set out = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for tok in value.split(b","):
                tok = tok.strip().lower()
                if tok:
                    out.add(tok)
    return out


cdef void _write_fields(list parts, list headers, object content_length, bint chunked):
    cdef set listed = _connection_tokens(headers)
    cdef bytes lname
    for name, value in headers:
        lname = name.lower()
        if lname in _HOP or lname in listed:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)


cpdef bytes encode_request_head(bytes method, bytes url, list headers, object content_length, bint chunked):
    """Request head for the upstream (HTTP/1.1, keep-alive): hop-by-hop headers and those the
    Connection header names are dropped, framing is ours: `chunked`, else Content-Length."""
    cdef list parts = [method, b" ", url, b" HTTP/1.1\r\n"]
    _write_fields(parts, headers, content_length, chunked)
    parts.append(b"\r\n")
    return b"".join(parts)


cpdef bytes encode_response_head(int status, bytes reason, list headers, object content_length, bint chunked, bint close):
    """Response head for the client, re-framed like encode_request_head; `close` adds Connection: close."""
    cdef list parts = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    _write_fields(parts, headers, content_length, chunked)
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


cpdef bytes encode_chunk(bytes data):
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
