"""Bidirectional byte relay between two asyncio transports, on bare `asyncio.Protocol`s.

Protocols rather than streams: with uvloop a chunk goes socket -> data_received -> write with no
coroutine, future or buffer copy in between (BENCH-BASELINE: that is what makes one Python hop cost
about what one haproxy hop does).

- Flow control: when one side's write buffer passes its high-water mark the transport calls that
  side's `pause_writing`, which stops reading the *other* side; `resume_writing` restarts it.
- Half-close: EOF from one side becomes `write_eof` on the other (after its buffered bytes); the
  connection is closed once both directions are done.
- Errors: a side lost with an error resets the other (RST), a clean loss closes it gracefully.
- Counting: bytes read from / written to each side go into that side's TcpStats; the relay calls
  `closed()` exactly once per side. Whoever accepted or dialed a side has already called `opened()`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from nodemesh.fastpath import TcpStats

HIGH_WATER = 256 * 1024  # bytes buffered towards a slow peer before we stop reading the fast one
LOW_WATER = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), so the peer fails fast instead of reading a
    clean EOF it could mistake for a complete response."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass  # already gone; abort() below still closes it
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One socket of the pair. `peer` is the other side; bytes read here are written there."""

    __slots__ = ("relay", "stats", "transport", "peer", "eof", "throttled", "lost")

    def __init__(self, relay: Relay, stats: TcpStats) -> None:
        self.relay = relay
        self.stats = stats
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by Relay.start
        self.peer: _Side = None  # type: ignore[assignment]
        self.eof = False  # this socket sent us FIN: never resume reading it (would re-deliver EOF)
        self.throttled = False  # reading paused because the peer's write buffer is full
        self.lost = False

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.stats.add_read(n)
        peer = self.peer
        if peer.lost or peer.transport.is_closing():
            return  # the pair is going down; the relay is already closing this side too
        peer.transport.write(data)
        peer.stats.add_write(n)

    def eof_received(self) -> bool:
        self.eof = True
        return self.relay._on_eof(self)

    def pause_writing(self) -> None:
        src = self.peer
        src.throttled = True
        if not src.eof and not src.transport.is_closing():
            src.transport.pause_reading()

    def resume_writing(self) -> None:
        src = self.peer
        src.throttled = False
        if not src.eof and not src.transport.is_closing():
            src.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._on_lost(self, exc)


class Relay:
    """Glue two connected transports together. Build it, then `start(...)` once; `on_done` runs
    when both sides are closed."""

    __slots__ = ("a", "b", "origin", "_on_done")

    def __init__(
        self, stats_a: TcpStats, stats_b: TcpStats, on_done: Callable[[], None] | None = None, origin: object = None
    ) -> None:
        # The protocol that accepted side a: after set_protocol it is reachable only from here, and it
        # holds the per-connection facts (plan, peer identity) that tap and stop() want.
        self.origin = origin
        self.a = _Side(self, stats_a)
        self.b = _Side(self, stats_b)
        self.a.peer, self.b.peer = self.b, self.a
        self._on_done = on_done

    def start(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        *,
        a_pending: bytes = b"",
        b_pending: bytes = b"",
        a_eof: bool = False,
        b_eof: bool = False,
    ) -> None:
        """Take over both transports. `*_pending` are bytes already read from that side (before the
        relay existed) that must reach the other side first; `*_eof` says that side already sent FIN."""
        for side, transport in ((self.a, a), (self.b, b)):
            side.transport = transport
            transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
            transport.set_protocol(side)
        for side, pending, eof in ((self.a, a_pending, a_eof), (self.b, b_pending, b_eof)):
            if pending:
                side.data_received(pending)
            if eof:
                side.eof = True
                if not self._on_eof(side):
                    return
        # Whoever owned the transports before may have paused reading while waiting for us.
        for side in (self.a, self.b):
            if not side.eof and not side.throttled and not side.transport.is_closing():
                side.transport.resume_reading()

    def _on_eof(self, side: _Side) -> bool:
        peer = side.peer
        if peer.lost or peer.transport.is_closing():
            return False
        if not peer.transport.can_write_eof():
            peer.transport.close()  # no half-close on this transport: end the whole pair
            return False
        peer.transport.write_eof()  # FIN goes out after the bytes already buffered
        if peer.eof:
            # Both directions finished: close() flushes what is left, then both sockets go.
            side.transport.close()
            peer.transport.close()
        return True  # keep this side open: the other direction may still be sending

    def _on_lost(self, side: _Side, exc: Exception | None) -> None:
        if side.lost:
            return
        side.lost = True
        side.stats.closed()
        peer = side.peer
        if not peer.lost:
            if not peer.transport.is_closing():
                if exc is not None:
                    reset_transport(peer.transport)  # propagate the failure, do not fake a clean end
                else:
                    peer.transport.close()
            return
        if self._on_done is not None:
            self._on_done()
