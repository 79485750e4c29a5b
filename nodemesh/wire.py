"""Framing of the controller <-> agent stream, sans-IO.

Each frame is a 4-byte big-endian length and a UTF-8 JSON object with a "type". Messages:
  agent -> controller  {"type": "hello", "node": str, "token": str, "version": int}  (version 0 = none)
  controller -> agent  {"type": "config", "version": int, "config": NodeConfig dict}
                       {"type": "error", "reason": str}   (then the controller closes)
  both ways            {"type": "ping"}                  (keepalive; liveness of a quiet stream)
With identity (mTLS stream; see controller/identity_service.py, agent/identity_client.py):
  agent -> controller  {"type": "bootstrap", "node", "token", "csr"}   (first and only message of a
                       server-authenticated TLS connection; the token is single use)
  controller -> agent  {"type": "node_cert", "identity", "chain": [PEM...], "bundle": PEM}
  agent -> controller  {"type": "csr", "id": int, "csr": PEM}          (on the mTLS stream, after hello)
  controller -> agent  {"type": "cert", "id", "identity", "chain", "bundle"}
                       {"type": "csr_refused", "id", "reason", "message"}
                       {"type": "bundle", "bundle": PEM}   (the trust bundle: right after hello, then on
                       every change, e.g. the steps of a root rotation; applies to new handshakes)
  The mTLS hello carries no token: the node certificate authenticates it.
Resume: an agent reconnecting sends the version it holds; the controller sends a config only if
that node's config changed since (the agent keeps serving its last good config meanwhile).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from nodemesh.errors import ProtocolError

MAX_FRAME = 16 * 1024 * 1024
_LEN = struct.Struct("!I")


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes in, take whole messages out. Raises ProtocolError on garbage or oversize frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise ProtocolError(f"peer announced a {n}-byte frame, over the {self._max}-byte limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                msg = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"frame is not JSON: {exc}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ProtocolError("frame must be a JSON object with a string 'type'")
            out.append(msg)
        return out
