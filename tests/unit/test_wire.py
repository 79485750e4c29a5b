"""Stream framing is sans-IO: feed bytes in any split, get whole messages out."""

from __future__ import annotations

import struct

import pytest

from nodemesh.errors import ProtocolError
from nodemesh.wire import FrameDecoder, encode

HELLO = {"type": "hello", "node": "node1", "token": "t", "version": 0}
PING = {"type": "ping"}


def test_roundtrip():
    assert FrameDecoder().feed(encode(HELLO)) == [HELLO]


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 7, 16])
def test_split_feeds_reassemble(split):
    data = encode(HELLO) + encode(PING)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), split):
        out += dec.feed(data[i:i + split])
    assert out == [HELLO, PING]


def test_several_frames_in_one_feed_plus_a_partial():
    data = encode(PING) * 3 + encode(HELLO)
    dec = FrameDecoder()
    assert dec.feed(data[:-3]) == [PING, PING, PING]
    assert dec.feed(data[-3:]) == [HELLO]
    assert dec.feed(b"") == []


def test_oversize_announced_frame_rejected_before_buffering():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="101-byte frame"):
        dec.feed(struct.pack("!I", 101))


def test_encode_refuses_oversize(monkeypatch):
    monkeypatch.setattr("nodemesh.wire.MAX_FRAME", 10)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"type": "config", "config": "x" * 20})


@pytest.mark.parametrize("case, body, words", [
    ("not JSON", b"\xff\xfegarbage", "not JSON"),
    ("truncated JSON", b'{"type": ', "not JSON"),
    ("JSON but not an object", b"[1, 2]", "JSON object"),
    ("object without type", b'{"node": "x"}', "string 'type'"),
    ("type not a string", b'{"type": 3}', "string 'type'"),
])
def test_garbage_rejected(case, body, words):
    with pytest.raises(ProtocolError, match=words):
        FrameDecoder().feed(struct.pack("!I", len(body)) + body)


def test_http_request_to_the_stream_port_is_rejected():
    # "GET " read as a length is ~1.2 GB: refused at once, not buffered
    with pytest.raises(ProtocolError, match="over the"):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")
