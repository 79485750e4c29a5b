from typing import Protocol

MAX_HEAD_BYTES: int
LAST_CHUNK: bytes

class Http1Error(Exception):
    """A message the proxy refuses; `status` is what the client gets before the close."""

    status: int
    reason: str
    def __init__(self, status: int, reason: str) -> None: ...

class Head:
    method: bytes
    url: bytes
    status: int
    reason: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    host: bytes | None
    def get(self, lname: bytes) -> bytes | None: ...

class MessageSink(Protocol):
    def on_head(self, head: Head) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_end(self) -> None: ...

class Http1Reader:
    """httptools callback target; set `.parser` to the httptools parser it serves."""

    parser: object
    error: Http1Error | None
    in_message: bool
    head_done: bool
    def __init__(self, sink: MessageSink, is_request: bool, max_head: int = ...) -> None: ...

def encode_request_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool) -> bytes: ...
def encode_response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], content_length: int | None, chunked: bool, close: bool) -> bytes: ...
def encode_chunk(data: bytes) -> bytes: ...
