"""The lab's sample HTTP server: answers who it is, so a client can see where the mesh sent it.

Any path → 200 JSON {"pod", "namespace", "node", "path", "method"} (POD_NAME, POD_NAMESPACE,
NODE_NAME from the environment the lab sets); /healthz → 200 "ok", never delayed or failed.
--latency-ms adds a delay per request, --fail-rate answers that fraction with 500 (both also from
SAMPLE_LATENCY_MS / SAMPLE_FAIL_RATE). asyncio + httptools, HTTP/1.1 keep-alive, pipelining-safe
(one response at a time per connection, in order).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from dataclasses import dataclass

import click
import httptools
import uvloop


@dataclass(frozen=True)
class Identity:
    pod: str
    namespace: str
    node: str

    @classmethod
    def from_env(cls) -> Identity:
        return cls(os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", ""), os.environ.get("NODE_NAME", ""))


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    fail_rate: float = 0.0


def _response(status: int, body: bytes, content_type: str, keep_alive: bool) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}.get(status, "")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


class _HttpConnection(asyncio.Protocol):
    def __init__(self, ident: Identity, behaviour: Behaviour) -> None:
        self.ident = ident
        self.behaviour = behaviour
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.url = b""
        self.queue: asyncio.Queue[tuple[str, str, bool] | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self._respond())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.queue.put_nowait(None)
        except httptools.HttpParserError:
            self.transport.write(_response(400, b"bad request\n", "text/plain", False))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = httptools.parse_url(self.url).path.decode(errors="replace")
        self.url = b""
        self.queue.put_nowait((method, path, self.parser.should_keep_alive()))

    async def _respond(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                self.transport.close()
                return
            method, path, keep_alive = item
            status, body, ctype = await self._handle(method, path)
            if self.transport.is_closing():
                return
            self.transport.write(_response(status, body, ctype, keep_alive))
            if not keep_alive:
                self.transport.close()
                return

    async def _handle(self, method: str, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        b = self.behaviour
        if b.latency_ms > 0:
            await asyncio.sleep(b.latency_ms / 1000)
        doc = {"pod": self.ident.pod, "namespace": self.ident.namespace, "node": self.ident.node, "path": path, "method": method}
        if b.fail_rate > 0 and random.random() < b.fail_rate:
            doc["error"] = "injected failure (--fail-rate)"
            return 500, json.dumps(doc).encode() + b"\n", "application/json"
        return 200, json.dumps(doc).encode() + b"\n", "application/json"


async def serve(host: str, port: int, behaviour: Behaviour, ident: Identity | None = None) -> asyncio.AbstractServer:
    """Start listening and return the server (the caller owns its lifetime)."""
    ident = ident or Identity.from_env()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _HttpConnection(ident, behaviour), host, port, reuse_address=True)


async def _serve_forever(host: str, port: int, behaviour: Behaviour) -> None:
    server = await serve(host, port, behaviour)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"sample server on {bound[0]}:{bound[1]} (latency {behaviour.latency_ms} ms, fail rate {behaviour.fail_rate})", flush=True)
    await stop.wait()
    server.close()


@click.command("sample-server")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--latency-ms", envvar="SAMPLE_LATENCY_MS", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Delay added to each response.")
@click.option("--fail-rate", envvar="SAMPLE_FAIL_RATE", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of requests answered 500.")
def command(host: str, port: int, latency_ms: float, fail_rate: float) -> None:
    """Run the lab's sample HTTP server (answers with its pod, namespace and node)."""
    uvloop.run(_serve_forever(host, port, Behaviour(latency_ms, fail_rate)))


def main(argv: list[str] | None = None) -> int:
    try:
        rc = command.main(args=argv, prog_name="nodemesh sample-server", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return rc if isinstance(rc, int) else 0
