"""A tiny admin HTTP/1.1 server (/metrics, /ready, /live) shared by the controller and the agent.

h11 does the protocol (sans-IO); asyncio streams only move bytes. Routes are sync callables
returning (status, content_type, body): admin answers are small and computed from memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus

import h11

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, bytes]]

IDLE_TIMEOUT = 30.0  # keep-alive connections idle longer than this are closed
_READ_SIZE = 64 * 1024
_TEXT = "text/plain; charset=utf-8"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _response(conn: h11.Connection, status: int, ctype: str, body: bytes, head_only: bool = False,
              extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    headers = [("content-type", ctype), ("content-length", str(len(body))), *extra]
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
    if not head_only:
        out += conn.send(h11.Data(data=body))
    return out + conn.send(h11.EndOfMessage())


def _answer(routes: Mapping[str, Route], method: bytes, target: bytes) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
    if method not in (b"GET", b"HEAD"):
        return 405, _TEXT, b"method not allowed: the admin server only answers GET\n", (("allow", "GET, HEAD"),)
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    route = routes.get(path)
    if route is None:
        known = ", ".join(sorted(routes))
        return 404, _TEXT, f"not found: {path} (try {known})\n".encode(), ()
    try:
        status, ctype, body = route()
    except Exception:
        log.exception("admin route %s failed", path)
        return 500, _TEXT, b"internal error\n", ()
    return status, ctype, body, ()


async def _serve_connection(routes: Mapping[str, Route], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    try:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint or 400
                    writer.write(_response(conn, status, _TEXT, f"bad request: {exc}\n".encode()))
                    await writer.drain()
                return
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), IDLE_TIMEOUT)
                conn.receive_data(data)  # b"" marks EOF; h11 turns it into ConnectionClosed or an error
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, ctype, body, extra = _answer(routes, request.method, request.target)
                writer.write(_response(conn, status, ctype, body, request.method == b"HEAD", extra))
                await writer.drain()
                request = None
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return  # PAUSED cannot happen as we answer each request in turn; never spin on it
            # h11.Data (a body nobody asked for) is read and dropped
    except (asyncio.TimeoutError, ConnectionError, h11.LocalProtocolError):
        pass
    finally:
        writer.close()


async def serve_admin(host: str, port: int, routes: Mapping[str, Route]) -> asyncio.AbstractServer:
    """Starts serving `routes` (path -> callable) on host:port; port 0 picks a free port.

    404 for unknown paths, 405 for methods other than GET/HEAD, 400 for malformed requests;
    keep-alive per HTTP/1.1.
    """
    routes = dict(routes)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(routes, reader, writer)

    return await asyncio.start_server(handle, host, port)
