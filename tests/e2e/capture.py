"""A packet capture on a lab bridge with a raw AF_PACKET socket (no tcpdump needed).

The bridge is put in promiscuous mode through a packet membership (dropped when the socket
closes), so frames bridged between the nodes' veths are copied to us too.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1


@dataclass(frozen=True)
class Segment:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


class Capture:
    def __init__(self, ifname: str, max_frames: int = 200_000) -> None:
        self.ifname = ifname
        self.segments: list[Segment] = []
        self.frames = 0
        self._max = max_frames
        self._stop = threading.Event()
        # Protocol 0 receives nothing until bind() names the interface and the protocol; opening with
        # ETH_P_ALL would queue frames from every interface (e.g. loopback tests) before the bind.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._sock.bind((ifname, ETH_P_ALL))  # Python applies htons to the protocol itself
        mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
        self._sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        seen: set[tuple[bytes, int]] = set()  # a frame may be copied twice (port + bridge): keep one
        while not self._stop.is_set() and self.frames < self._max:
            try:
                frame = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames += 1
            if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:  # TCP only
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            if len(tcp) < 20:
                continue
            doff = (tcp[12] >> 4) * 4
            payload = bytes(tcp[doff:])
            if not payload:
                continue
            key = (bytes(ip[:total][-min(64, total):]) + ip[4:6], len(payload))
            if key in seen:
                continue
            seen.add(key)
            src = (socket.inet_ntoa(ip[12:16]), struct.unpack("!H", tcp[0:2])[0])
            dst = (socket.inet_ntoa(ip[16:20]), struct.unpack("!H", tcp[2:4])[0])
            self.segments.append(Segment(src, dst, payload))

    def stream_bytes(self, port: int) -> bytes:
        """All payload bytes to or from `port`, concatenated (enough to look for plaintext)."""
        return b"".join(s.payload for s in self.segments if port in (s.src[1], s.dst[1]))
