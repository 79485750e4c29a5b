"""agent/inbound_http.Sniffer: the detect step before an unknown-protocol port with route policies
is served as HTTP/1 (or relayed as L4), table-driven over what the client sends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodemesh.agent.inbound_http import Sniffer


class FakeTransport:
    def __init__(self) -> None:
        self.protocol: Any = None
        self.reading = False

    def set_protocol(self, p: Any) -> None:
        self.protocol = p

    def resume_reading(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("pending, chunks, eof, lost, want", [
    (b"GET / HTTP/1.1\r\n", [], False, False, (True, b"GET / HTTP/1.1\r\n", False)),  # decided by what was pending
    (b"", [b"GE", b"T /x HTTP/1.1\r\n"], False, False, (True, b"GET /x HTTP/1.1\r\n", False)),
    (b"", [b"\x16\x03\x01\x00\x05"], False, False, (False, b"\x16\x03\x01\x00\x05", False)),  # TLS: not HTTP/1
    (b"", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], False, False, (False, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False)),
    (b"GE", [], True, False, (False, b"GE", True)),  # EOF on an ambiguous prefix: not HTTP
    (b"", [], False, True, (None, b"", True)),  # the client left first
    (b"", [], False, False, (False, b"", False)),  # silent until the deadline: server-speaks-first, L4
])
def test_sniffer(pending: bytes, chunks: list[bytes], eof: bool, lost: bool, want: tuple) -> None:
    async def body() -> list[tuple]:
        got: list[tuple] = []
        t = FakeTransport()
        s = Sniffer(lambda *a: got.append(a), timeout=0.05)
        s.start(t, pending, False)
        for c in chunks:
            s.data_received(c)
        if eof:
            s.eof_received()
        if lost:
            s.connection_lost(None)
        await asyncio.sleep(0.1)
        s.connection_lost(None)  # after the verdict: no second call
        assert not t.reading or got[0][0] is None  # paused at the verdict: the next owner resumes
        return got

    assert asyncio.run(body()) == [want]
