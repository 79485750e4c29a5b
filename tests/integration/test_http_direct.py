"""The callback-driven HTTP/1 path (agent/http_proxy.py `_Direct`) at its edges, on real loopback
sockets: response flow control against a slow client (the pooled upstream is paused, then resumed
before it goes back to the pool), an upstream that dies mid-response, an EOF-delimited response
re-framed as chunked, and a malformed request pipelined behind one in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import h11

from .test_http_proxy import C_IP, VIP_B, client, default_services, lab, run, service


class BigOrBroken(asyncio.Protocol):
    """GET /big → 4 MiB with Content-Length; /die → a head promising 100 bytes, 10 sent, then RST;
    /eof → HTTP/1.0-style body delimited by close; anything else → "ok"."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h = h11.Connection(h11.SERVER)

    def data_received(self, data: bytes) -> None:
        self.h.receive_data(data)
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                path = ev.target
                if path == b"/die":
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    sock = self.transport.get_extra_info("socket")
                    import socket
                    import struct
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.transport.abort()
                    return
                if path == b"/eof":
                    self.transport.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-the-end")
                    self.transport.close()
                    return
                body = b"x" * (4 * 1024 * 1024) if path == b"/big" else b"ok"
                self.transport.write(self.h.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                                     + self.h.send(h11.Data(data=body)) + self.h.send(h11.EndOfMessage()))
            elif isinstance(ev, h11.EndOfMessage):
                self.h.start_next_cycle()


async def _with_backend(m: Any) -> asyncio.AbstractServer:
    srv = await asyncio.get_running_loop().create_server(BigOrBroken, C_IP, 0)
    m.configure(default_services(m)[:1] + [service("web-b", VIP_B, [(m.pods["c"], srv.sockets[0].getsockname()[1])])])
    return srv


def test_slow_client_pauses_the_upstream_and_the_pooled_connection_is_resumed() -> None:
    async def body() -> None:
        async with lab() as m:
            srv = await _with_backend(m)
            c = await client(m, (VIP_B, 80))
            c.w.transport.pause_reading()  # a slow client: the proxy's write buffer fills up
            pending = asyncio.ensure_future(c.request("GET", "/big"))
            await asyncio.sleep(0.3)
            assert not pending.done()
            c.w.transport.resume_reading()
            status, _, data = await asyncio.wait_for(pending, 5)
            assert status == 200 and len(data) == 4 * 1024 * 1024
            for _ in range(3):  # the same pooled upstream serves again: it was resumed before reuse
                status, _, data = await asyncio.wait_for(c.request("GET", "/small"), 2)
                assert (status, data) == (200, b"ok")
            c.close()
            srv.close()

    run(body)


def test_upstream_dying_mid_response_cuts_the_client_and_before_the_head_answers_502() -> None:
    async def body() -> None:
        async with lab() as m:
            srv = await _with_backend(m)
            c = await client(m, (VIP_B, 80))
            c.w.write(b"GET /die HTTP/1.1\r\nHost: b\r\n\r\n")
            data = b""
            try:
                while chunk := await asyncio.wait_for(c.r.read(65536), 2):
                    data += chunk
            except ConnectionResetError:
                pass
            # the head (with its 100-byte promise) and 10 bytes went out: the client must see a cut,
            # never a complete message
            assert data.startswith(b"HTTP/1.1 200") and len(data.split(b"\r\n\r\n", 1)[1]) < 100
            c2 = await client(m, (VIP_B, 80))
            status, _, body_ = await c2.request("GET", "/eof")  # close-delimited → chunked to the client
            assert (status, body_) == (200, b"until-the-end")
            status, _, _ = await c2.request("GET", "/ok")  # the client connection stays usable
            assert status == 200
            c2.close()
            srv.close()

    run(body)


def test_malformed_request_behind_one_in_flight_gets_its_answer_then_400() -> None:
    async def body() -> None:
        async with lab() as m:
            srv = await _with_backend(m)
            r, w = await m.connect((VIP_B, 80))
            w.write(b"GET /ok HTTP/1.1\r\nHost: b\r\n\r\nGET /x HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 5)
            first, _, rest = data.partition(b"ok")
            assert first.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 400 "), data
            w.close()
            srv.close()

    run(body)
