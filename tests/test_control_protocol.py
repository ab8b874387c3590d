"""The framing of the control protocol, both sides (asyncio reader and blocking socket)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from xos_sshd.control.protocol import (
    MAX_FRAME,
    ControlError,
    decode,
    encode,
    read_frame,
    recv_frame,
    send_frame,
)


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_encode_decode_round_trip_and_limit() -> None:
    frame = encode({'op': 'admin.list', 'text': 'é'})
    (length,) = struct.unpack('>I', frame[:4])
    assert length == len(frame) - 4 and decode(frame[4:]) == {'op': 'admin.list', 'text': 'é'}
    with pytest.raises(ValueError):
        encode({'pad': 'x' * MAX_FRAME})
    assert len(encode({'pad': 'x' * MAX_FRAME}, limit=2 * MAX_FRAME)) > MAX_FRAME


@pytest.mark.parametrize('body', [b'', b'\xff', b'[]', b'"x"', b'null', b'{"a":', b'[' * 5000])
def test_decode_refuses_anything_but_an_object(body: bytes) -> None:
    with pytest.raises(ControlError) as info:
        decode(body)
    assert info.value.reason == 'bad-request' and not info.value.fatal


async def test_read_frame_limits() -> None:
    assert await read_frame(_reader(encode({'op': 'x'}))) == {'op': 'x'}
    assert await read_frame(_reader(b'')) is None  # clean end of stream
    with pytest.raises(ControlError) as info:
        await read_frame(_reader(struct.pack('>I', MAX_FRAME + 1)))
    assert info.value.reason == 'frame-too-large' and info.value.fatal
    with pytest.raises(ControlError) as info:
        await read_frame(_reader(struct.pack('>I', 10) + b'{}'))
    assert info.value.reason == 'truncated-frame'
    with pytest.raises(ControlError) as info:  # a frame that stalls half-way
        await read_frame(_reader(struct.pack('>I', 10) + b'{', eof=False), frame_timeout=0.2)
    assert info.value.reason == 'frame-timeout' and info.value.fatal
    # silence is an idle connection, not an error
    assert await read_frame(_reader(b'', eof=False), idle_timeout=0.1) is None


def test_blocking_side() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {'op': 'ping'})
        assert recv_frame(b) == {'op': 'ping'}
        a.sendall(struct.pack('>I', 100))
        with pytest.raises(ControlError):
            recv_frame(b, limit=10)
        a.close()
        with pytest.raises(ConnectionError):
            recv_frame(b)
