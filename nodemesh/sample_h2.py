"""The lab's sample HTTP/2 (gRPC-shaped) server and client, on the `h2` library, prior knowledge
(no TLS, no upgrade: what gRPC sends in-mesh).

Server, per stream:
  /healthz                  → 200 "ok" (plain h2)
  content-type application/grpc, any path but the one below →
                              200, one gRPC message (5-byte prefix + JSON {"pod", "namespace",
                              "node", "path"}), trailers grpc-status 0; with --fail-rate a
                              trailers-only response with --fail-code (default 14 UNAVAILABLE);
                              --latency-ms delays the answer
  /nodemesh.Echo/Stream     → echoes the request body back as it arrives (flow control honoured
                              both ways: received data is credited only once echoed), then
                              trailers grpc-status 0, x-echo-bytes and the request's x-client-trailer
  anything else             → 200 JSON as above (plain h2, e.g. for h2load)
Client: `call()` one request on a shared connection (streams multiplexed), bodies streamed within
the server's windows; the CLI makes --count calls with --concurrency in flight over ONE connection
and prints {"pods": {pod: n}, "grpc_status": {code: n}, "errors": n} as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import click
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import uvloop
from h2.errors import ErrorCodes

from nodemesh.sample_server import Behaviour as HttpBehaviour
from nodemesh.sample_server import Identity

ECHO_PATH = "/nodemesh.Echo/Stream"
WHO_PATH = "/nodemesh.Echo/Who"


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    fail_code: int = 14  # UNAVAILABLE

    @classmethod
    def of(cls, b: HttpBehaviour) -> Behaviour:
        return cls(b.latency_ms, b.fail_rate)


def grpc_frame(payload: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return struct.pack(">BI", 0, len(payload)) + payload


def grpc_messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        _, n = struct.unpack(">BI", data[pos:pos + 5])
        out.append(data[pos + 5:pos + 5 + n])
        pos += 5 + n
    return out


class _Flow:
    """Window waits and write backpressure for one h2 connection (server or client)."""

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def send(self, sid: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.closed:
                raise ConnectionError("connection closed")
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                fut = asyncio.get_running_loop().create_future()
                self.waiters.append(fut)
                await fut
                continue
            n = min(window, len(data) - pos, self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, data[pos:pos + n])
            pos += n
            self.flush()
            await self.writable.wait()


class _FlowProtocol(asyncio.Protocol):
    """Connection start, write backpressure and connection loss for a protocol that owns a `_Flow`
    (server or client)."""

    flow: _Flow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.flow.transport = transport  # type: ignore[assignment]
        self.flow.conn.initiate_connection()
        self.flow.flush()

    def pause_writing(self) -> None:
        self.flow.writable.clear()

    def resume_writing(self) -> None:
        self.flow.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.closed = True
        self.flow.writable.set()
        self.flow.wake()
        self._lost()

    def _lost(self) -> None:
        """What else this side stops when the connection is gone."""


class _ServerConn(_FlowProtocol):
    def __init__(self, ident: Identity, behaviour: Behaviour) -> None:
        self.ident = ident
        self.behaviour = behaviour
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.flow = _Flow(self.conn)
        self.streams: dict[int, asyncio.Queue[tuple[str, object]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flow.flush()
            assert self.flow.transport is not None
            self.flow.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                q: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
                self.streams[ev.stream_id] = q
                task = asyncio.get_running_loop().create_task(self._serve(ev.stream_id, dict(ev.headers), q))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(ev, h2.events.DataReceived):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id].put_nowait(("data", (ev.data, ev.flow_controlled_length)))
            elif isinstance(ev, h2.events.TrailersReceived):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id].put_nowait(("trailers", dict(ev.headers)))
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id].put_nowait(("end", None))
            elif isinstance(ev, h2.events.StreamReset):
                q2 = self.streams.pop(ev.stream_id, None)
                if q2 is not None:
                    q2.put_nowait(("reset", None))
                self.flow.wake()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.flow.wake()
        self.flow.flush()

    def _lost(self) -> None:
        for t in list(self.tasks):
            t.cancel()

    async def _serve(self, sid: int, headers: dict[bytes, bytes], q: asyncio.Queue[tuple[str, object]]) -> None:
        try:
            path = headers.get(b":path", b"/").decode()
            grpc = headers.get(b"content-type", b"").startswith(b"application/grpc")
            if path == ECHO_PATH:
                await self._echo(sid, q)
                return
            trailers_in: dict[bytes, bytes] = {}
            while True:  # a unary request: read it whole (small), crediting as it comes
                kind, val = await q.get()
                if kind == "data":
                    self.conn.acknowledge_received_data(val[1], sid)  # type: ignore[index]
                    self.flow.flush()
                elif kind == "trailers":
                    trailers_in = val  # type: ignore[assignment]
                elif kind in ("end", "reset"):
                    break
            if kind == "reset":
                return
            b = self.behaviour
            if path != "/healthz" and b.latency_ms > 0:
                await asyncio.sleep(b.latency_ms / 1000)
            if path == "/healthz":
                self._respond(sid, [(b":status", b"200")], b"ok\n", None)
                return
            doc = {"pod": self.ident.pod, "namespace": self.ident.namespace, "node": self.ident.node, "path": path}
            if b.fail_rate > 0 and random.random() < b.fail_rate:
                if grpc:  # trailers-only: the status in the head, no body
                    self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                 (b"grpc-status", str(b.fail_code).encode()), (b"grpc-message", b"injected failure")], end_stream=True)
                    self.flow.flush()
                else:
                    self._respond(sid, [(b":status", b"500"), (b"content-type", b"application/json")], json.dumps(doc).encode(), None)
                return
            body = json.dumps(doc).encode()
            if grpc:
                tr = [(b"grpc-status", b"0")] + ([(b"x-client-trailer", trailers_in[b"x-client-trailer"])] if b"x-client-trailer" in trailers_in else [])
                self._respond(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], grpc_frame(body), tr)
            else:
                self._respond(sid, [(b":status", b"200"), (b"content-type", b"application/json")], body, None)
        except (h2.exceptions.StreamClosedError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.streams.pop(sid, None)

    def _respond(self, sid: int, head: list[tuple[bytes, bytes]], body: bytes, trailers: list[tuple[bytes, bytes]] | None) -> None:
        # small bodies only (fit the default 64 KiB window)
        self.conn.send_headers(sid, head + [(b"content-length", str(len(body)).encode())] * (trailers is None), end_stream=not body and trailers is None)
        if body:
            self.conn.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=True)
        self.flow.flush()

    async def _echo(self, sid: int, q: asyncio.Queue[tuple[str, object]]) -> None:
        self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.flow.flush()
        total = 0
        trailers: list[tuple[bytes, bytes]] = []
        while True:
            kind, val = await q.get()
            if kind == "reset":
                return
            if kind == "data":
                data, flow = val  # type: ignore[misc]
                await self.flow.send(sid, data)  # echoed first, credited after: real backpressure
                total += len(data)
                self.conn.acknowledge_received_data(flow, sid)
                self.flow.flush()
            elif kind == "trailers":
                t = val  # type: ignore[assignment]
                if b"x-client-trailer" in t:  # type: ignore[operator]
                    trailers.append((b"x-client-trailer", t[b"x-client-trailer"]))  # type: ignore[index]
            elif kind == "end":
                break
        self.conn.send_headers(sid, [(b"grpc-status", b"0"), (b"x-echo-bytes", str(total).encode())] + trailers, end_stream=True)
        self.flow.flush()


async def serve(host: str, port: int, behaviour: Behaviour, ident: Identity | None = None) -> asyncio.AbstractServer:
    """Start the h2 server and return it (the caller owns its lifetime)."""
    ident = ident or Identity.from_env()
    return await asyncio.get_running_loop().create_server(lambda: _ServerConn(ident, behaviour), host, port, reuse_address=True)


# ---- client -------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code, when the stream was reset

    @property
    def grpc_status(self) -> int | None:
        v = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return int(v) if v is not None else None


class _Stream:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[dict[bytes, bytes]] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.data = bytearray()
        self.trailers: dict[bytes, bytes] = {}
        self.reset: int | None = None


class H2Client(_FlowProtocol):
    """One client connection; `call` may run concurrently (one stream each)."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.flow = _Flow(self.conn)
        self.streams: dict[int, _Stream] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hold = False  # True: credit nothing received (a reader that stopped reading)
        self.held: list[tuple[int, int]] = []

    @classmethod
    async def connect(cls, host: str, port: int, sock: socket.socket | None = None) -> H2Client:
        loop = asyncio.get_running_loop()
        if sock is not None:
            _, proto = await loop.create_connection(cls, sock=sock)
        else:
            _, proto = await loop.create_connection(cls, host, port)
        return proto

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._fail_all()
            return
        for ev in events:
            st = self.streams.get(getattr(ev, "stream_id", -1) or -1)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                st.head.set_result(dict(ev.headers))
            elif isinstance(ev, h2.events.DataReceived) and st is not None:
                st.data += ev.data
                if self.hold:
                    self.held.append((ev.flow_controlled_length, ev.stream_id))
                else:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and st is not None:
                st.trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                if not st.done.done():
                    st.done.set_result(None)
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                st.reset = ev.error_code
                for f in (st.head, st.done):
                    if not f.done():
                        f.set_result({} if f is st.head else None)  # type: ignore[arg-type]
                self.flow.wake()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
                self._fail_all()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.flow.wake()
        self.flow.flush()

    def _lost(self) -> None:
        self._fail_all()
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail_all(self) -> None:
        for st in self.streams.values():
            for f in (st.head, st.done):
                if not f.done():
                    f.set_exception(ConnectionError("h2 connection closed"))
                    f.exception()

    async def call(self, path: str, body: bytes | Iterable[bytes] | AsyncIterator[bytes] = b"", authority: str = "svc",
                   grpc: bool = True, method: str = "POST", trailers: list[tuple[bytes, bytes]] | None = None,
                   extra: list[tuple[bytes, bytes]] | None = None) -> Response:
        """One request; `body` bytes or chunks (sent within the windows as they come)."""
        head = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode()), (b":path", path.encode())]
        if grpc:
            head += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        head += extra or []
        sid = self.conn.get_next_available_stream_id()
        st = self.streams[sid] = _Stream()
        empty = isinstance(body, bytes) and not body and trailers is None
        self.conn.send_headers(sid, head, end_stream=empty)
        self.flow.flush()
        try:
            if not empty:
                chunks: Iterable[bytes] | AsyncIterator[bytes] = [body] if isinstance(body, bytes) else body
                if hasattr(chunks, "__aiter__"):
                    async for c in chunks:  # type: ignore[union-attr]
                        await self._send(sid, st, c)
                else:
                    for c in chunks:  # type: ignore[union-attr]
                        await self._send(sid, st, c)
                if st.reset is None:
                    if trailers is not None:
                        self.conn.send_headers(sid, trailers, end_stream=True)
                    else:
                        self.conn.end_stream(sid)
                    self.flow.flush()
            headers = await st.head
            await st.done
        finally:
            self.streams.pop(sid, None)
        status = int(headers.get(b":status", b"0")) if headers else 0
        return Response(status, headers, bytes(st.data), st.trailers, st.reset)

    async def _send(self, sid: int, st: _Stream, data: bytes) -> None:
        if st.reset is None and data:
            try:
                await self.flow.send(sid, data)
            except h2.exceptions.StreamClosedError:
                return

    def release(self) -> None:
        """Stop holding: credit everything received so far."""
        self.hold = False
        held, self.held = self.held, []
        for flow, sid in held:
            try:
                self.conn.acknowledge_received_data(flow, sid)
            except h2.exceptions.StreamClosedError:
                pass
        self.flow.flush()

    def close(self) -> None:
        if self.flow.transport is not None and not self.flow.transport.is_closing():
            self.conn.close_connection()
            self.flow.flush()
            self.flow.transport.close()


async def _client_run(url: str, count: int, concurrency: int, path: str) -> dict[str, object]:
    u = urlsplit(url)
    client = await H2Client.connect(u.hostname or "127.0.0.1", u.port or 80)
    pods: dict[str, int] = {}
    codes: dict[str, int] = {}
    errors = 0
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal errors
        async with sem:
            try:
                r = await client.call(path or u.path or WHO_PATH, grpc_frame(b"{}"), authority=u.netloc)
            except ConnectionError:
                errors += 1
                return
        code = r.grpc_status
        codes[str(code)] = codes.get(str(code), 0) + 1
        if code == 0:
            for msg in grpc_messages(r.data):
                pod = json.loads(msg).get("pod", "?")
                pods[pod] = pods.get(pod, 0) + 1

    await asyncio.gather(*(one() for _ in range(count)))
    client.close()
    return {"pods": pods, "grpc_status": codes, "errors": errors}


@click.command("sample-h2-server")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--latency-ms", envvar="SAMPLE_LATENCY_MS", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Delay added to each response.")
@click.option("--fail-rate", envvar="SAMPLE_FAIL_RATE", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of gRPC calls failed.")
@click.option("--fail-code", default=14, show_default=True, type=click.IntRange(1, 16), help="grpc-status of a failed call.")
def server_command(host: str, port: int, latency_ms: float, fail_rate: float, fail_code: int) -> None:
    """Run the lab's sample HTTP/2 (gRPC-shaped) server."""

    async def main() -> None:
        srv = await serve(host, port, Behaviour(latency_ms, fail_rate, fail_code))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"sample h2 server on {host}:{srv.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()
        srv.close()

    uvloop.run(main())


@click.command("sample-h2-client")
@click.argument("url")
@click.option("--count", default=10, show_default=True, type=click.IntRange(1, 100000), help="Calls to make.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 1000), help="Calls in flight at once (streams on one connection).")
@click.option("--path", default="", help=f"gRPC method path (default: the URL's path, else {WHO_PATH}).")
def client_command(url: str, count: int, concurrency: int, path: str) -> None:
    """Make gRPC-shaped calls over ONE h2 connection; print per-pod and per-grpc-status counts as JSON."""
    try:
        out = uvloop.run(_client_run(url, count, concurrency, path))
    except OSError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    print(json.dumps(out, sort_keys=True))
    sys.stdout.flush()
    codes = out["grpc_status"]
    assert isinstance(codes, dict)
    if out["errors"] or any(k != "0" for k in codes):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    server_command()
