"""Same-node L4 kernel splice: an authorized opaque TCP connection between two pods of this node
stops going through the proxy's user space once it is relaying.

The relay starts as usual (bytes read while dialing are delivered first). Then, for a `local`
plan, `Splicer.start` runs once:
  1. pause reading both sockets and name each one's partner in splice_peer (bpf/redirect.c then
     stops feeding them through the sk_msg shortcut, so every new byte arrives as TCP);
  2. drain what already sits in their receive queues and relay it, and wait until the proxy's
     write buffers are empty (every byte the proxy relayed is in the kernel before the kernel
     starts forwarding: order is kept);
  3. put both sockets into splice_hash (bpf/splice.c's sk_skb verdict sends what either receives
     out of the other) and resume reading, only to see FIN/RST: user space then reads ~nothing.
Close is still observed by the relay; a FIN is passed on only once the bytes the kernel forwarded
before it are in the partner's TCP stream (else the FIN could overtake them). Policy changes still
cut the connection (the authorizer resets both sockets; the kernel drops them from the map).
Spliced bytes are added to the connection's tcp_read/write_bytes_total when it closes.
Anything unexpected (a side closing mid-way, a map update failing) leaves the connection relayed
in user space, counted as `aborted`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from nodemesh.agent.relay import Relay, _Side

log = logging.getLogger(__name__)

DRAIN_READS = 64  # receive-queue reads before committing (the verdict forwards the rest in order)
SETTLE_TIMEOUT = 2.0  # seconds to wait for the proxy's write buffers / the kernel's backlog
_TCP_INFO_LEN = 232
_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue (unacked + unsent)


def stream_bytes(sock: socket.socket) -> int:
    """Bytes ever queued into this socket's TCP stream (acked + still in the send queue), plus one
    on sockets whose bytes_acked counts their SYN: use differences."""
    import fcntl

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked = struct.unpack_from("=Q", info, _BYTES_ACKED)[0] if len(info) >= _BYTES_ACKED + 8 else 0
    outq = struct.unpack("=i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return int(acked) + int(outq)  # may include the SYN: compare against SplicedRelay.stream_base


class _Counting:
    """TcpStats seen through a per-connection byte count (the relay's stats are per label set)."""

    __slots__ = ("inner", "read", "written")

    def __init__(self, inner: Any) -> None:
        self.inner, self.read, self.written = inner, 0, 0

    def add_read(self, n: int) -> None:
        self.read += n
        self.inner.add_read(n)

    def add_write(self, n: int) -> None:
        self.written += n
        self.inner.add_write(n)

    def closed(self) -> None:
        self.inner.closed()


class SplicedRelay(Relay):
    """A Relay whose two sockets may be handed to the kernel (see the module docstring)."""

    __slots__ = ("splicer", "socks", "keys", "user_bytes_at_splice", "stream_base", "_folded")

    def __init__(self, stats_a: Any, stats_b: Any, on_done: Callable[[], None] | None = None, origin: object = None) -> None:
        super().__init__(_Counting(stats_a), _Counting(stats_b), on_done=on_done, origin=origin)
        self.splicer: Splicer | None = None
        self.socks: tuple[socket.socket, socket.socket] | None = None  # dups, owned here
        self.keys: tuple[Any, Any] | None = None  # set once spliced
        self.user_bytes_at_splice = 0
        self.stream_base = (0, 0)  # per socket: stream_bytes() minus the bytes the proxy wrote, at the splice
        self._folded = False

    def user_bytes(self) -> int:
        return self.a.stats.read + self.b.stats.read  # type: ignore[attr-defined]

    def _on_eof(self, side: _Side) -> bool:
        if self.keys is None or self.splicer is None:
            return super()._on_eof(side)
        asyncio.get_running_loop().create_task(self._eof_after_backlog(side))
        return True

    async def _eof_after_backlog(self, side: _Side) -> None:
        """Pass the FIN on once the bytes the kernel forwarded from `side` are in its partner's stream."""
        assert self.splicer is not None and self.keys is not None and self.socks is not None
        src_key = self.keys[0] if side is self.a else self.keys[1]
        dst_sock = self.socks[1] if side is self.a else self.socks[0]
        base = self.stream_base[1] if side is self.a else self.stream_base[0]
        peer = side.peer
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline and not peer.lost:
            try:
                expected = peer.stats.written + self.splicer.progs.splice_bytes(src_key)  # type: ignore[attr-defined]
                if peer.transport.get_write_buffer_size() == 0 and stream_bytes(dst_sock) - base >= expected:
                    break
            except OSError:
                break
            await asyncio.sleep(0.001)
        else:
            if not peer.lost:
                log.warning("spliced bytes not flushed within %.0fs; passing the FIN on anyway", SETTLE_TIMEOUT)
        if not super()._on_eof(side) and not side.transport.is_closing():
            side.transport.close()

    def _on_lost(self, side: _Side, exc: Exception | None) -> None:
        if not self._folded:
            self._folded = True
            if self.splicer is not None:
                self.splicer.finish(self)
        super()._on_lost(side, exc)


class Splicer:
    """Splices same-node opaque TCP connections with a loaded RedirectPrograms (`progs`)."""

    relay = SplicedRelay  # the Relay class outbound.py builds for plans it may splice

    def __init__(self, progs: Any) -> None:
        self.progs = progs
        self.spliced = 0  # connections handed to the kernel
        self.aborted = 0  # connections left in user space (closed mid-way, map update failed)
        self.skipped = 0  # connections whose pod sockets take the sk_msg shortcut instead
        self.userspace_bytes = 0  # bytes user space still relayed on spliced connections after the splice

    def start(self, relay: Relay) -> None:
        if isinstance(relay, SplicedRelay) and self.progs.splice_enabled():
            relay.splicer = self
            asyncio.get_running_loop().create_task(self._splice(relay))

    def _usable(self, relay: SplicedRelay) -> bool:
        return not any(s.eof or s.lost or s.transport.is_closing() for s in (relay.a, relay.b))

    async def _splice(self, relay: SplicedRelay) -> None:
        if not self._usable(relay):
            return
        try:
            socks = tuple(socket.socket(fileno=os.dup(s.transport.get_extra_info("socket").fileno())) for s in (relay.a, relay.b))
        except (OSError, AttributeError):
            self.aborted += 1
            return
        # The pods' own sockets must not be in the sk_msg shortcut map: this kernel answers a
        # blocking recv() on a sockmap'ed socket with EAGAIN when data arrives through TCP (as
        # spliced bytes do) while it waits. A sockhash cannot be asked "is this key in?" from user
        # space (a 4-byte value: ENOSPC either way), so the switch decides: with the shortcut on,
        # sock_ops put these sockets in, and the connection stays relayed (the shortcut is its).
        # Flipping the switch between a connect and its splice (milliseconds) is the one race left.
        if self.progs.shortcut_enabled():
            self.skipped += 1
            for s in socks:
                s.close()
            return
        relay.socks = socks  # type: ignore[assignment]
        for s in (relay.a, relay.b):
            s.transport.pause_reading()
        keys = None
        try:
            keys = self.progs.splice_partners(*socks)
            for side, sock in ((relay.a, socks[0]), (relay.b, socks[1])):
                for _ in range(DRAIN_READS):
                    try:
                        data = sock.recv(256 * 1024, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    if not data:  # FIN already here: too late to splice, let the relay see it
                        raise _Abort("closed while splicing")
                    side.data_received(data)
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while any(s.transport.get_write_buffer_size() for s in (relay.a, relay.b)):
                if time.monotonic() > deadline or not self._usable(relay):
                    raise _Abort("write buffers did not drain")
                await asyncio.sleep(0.001)
            if not self._usable(relay):
                raise _Abort("closed while splicing")
            # Every byte the proxy wrote is in the kernel now (buffers empty): the baseline for
            # "the kernel has forwarded everything" checks at FIN time.
            relay.stream_base = (stream_bytes(socks[0]) - relay.a.stats.written, stream_bytes(socks[1]) - relay.b.stats.written)  # type: ignore[attr-defined]
            self.progs.splice_commit(*socks)
        except (_Abort, OSError) as exc:
            self.aborted += 1
            log.debug("splice aborted: %s", exc)
            if keys is not None:
                self.progs.unsplice(keys)
            for s in relay.socks or ():
                s.close()
            relay.socks = None
        else:
            relay.keys = keys
            relay.user_bytes_at_splice = relay.user_bytes()
            self.spliced += 1
        for s in (relay.a, relay.b):
            if not s.eof and not s.throttled and not s.lost and not s.transport.is_closing():
                s.transport.resume_reading()

    def finish(self, relay: SplicedRelay) -> None:
        """At the first close: fold the kernel-forwarded bytes into the connection's counters."""
        if relay.keys is None:
            return
        ka, kb = relay.keys
        a_to_b, b_to_a = self.progs.splice_bytes(ka), self.progs.splice_bytes(kb)
        a, b = relay.a.stats, relay.b.stats
        self.userspace_bytes += relay.user_bytes() - relay.user_bytes_at_splice
        a.inner.add_read(a_to_b)  # type: ignore[attr-defined]
        b.inner.add_write(a_to_b)  # type: ignore[attr-defined]
        b.inner.add_read(b_to_a)  # type: ignore[attr-defined]
        a.inner.add_write(b_to_a)  # type: ignore[attr-defined]
        self.progs.unsplice(relay.keys)
        for s in relay.socks or ():
            s.close()

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("nodemesh_splice_connections_total", "Same-node TCP connections handed to the kernel (sk_skb splice)", value=self.spliced)
        yield CounterMetricFamily("nodemesh_splice_aborted_total", "Splices given up (connection closed mid-way, map update failed): relayed in user space", value=self.aborted)
        yield CounterMetricFamily("nodemesh_splice_skipped_total", "Same-node connections not spliced because their pod sockets use the sockmap shortcut", value=self.skipped)
        yield CounterMetricFamily("nodemesh_splice_userspace_bytes_total", "Bytes user space still relayed on spliced connections after the splice", value=self.userspace_bytes)


class _Abort(Exception):
    pass
