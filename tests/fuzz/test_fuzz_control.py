"""Fuzz the control socket framing (``xos_sshd.control.protocol``): whole byte streams through
the daemon's ``read_frame`` (against a reference reading of the documented format), the
client's ``recv_frame`` over a real socket pair, ``decode``, ``frame_length`` and ``encode``."""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import corpus, corpus_files, fuzz_bytes, fuzz_settings, ids, seeded
from targets import check_control_decode, check_control_stream, check_frame_length, reference_frames
from xos_sshd.control import protocol
from xos_sshd.control.protocol import MAX_FRAME, ControlError

STREAM_FILES = corpus_files("control_stream")
STREAM_SEEDS = corpus("control_stream")
LIMITS = st.sampled_from([MAX_FRAME, MAX_FRAME, MAX_FRAME, 0, 1, 2, 16, 64])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.sampled_from(["op", "user", "service", "answer", "n"]) | st.text(max_size=6),
                               json_values, max_size=5)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def frame_streams(draw) -> bytes:
    """Well-formed frames of arbitrary JSON (objects mostly), possibly followed by junk."""
    parts = []
    for value in draw(st.lists(json_objects | json_values, max_size=4)):
        parts.append(_frame(json.dumps(value).encode("utf-8")))
    tail = draw(st.sampled_from([b"", b"", b"\x00", b"\x00\x00\x00\x05{}", struct.pack(">I", MAX_FRAME + 1), b"\xff" * 4]))
    return b"".join(parts) + tail


streams = st.one_of(fuzz_bytes(STREAM_SEEDS), frame_streams(),
                    st.lists(st.sampled_from(STREAM_SEEDS), min_size=2, max_size=4).map(b"".join))


@pytest.mark.parametrize("path", STREAM_FILES, ids=ids(STREAM_FILES))
def test_control_stream_seed(path: Path) -> None:
    check_control_stream(path.read_bytes())


def test_control_stream_limit_edges() -> None:
    """A body of exactly MAX_FRAME bytes is read; one byte more is frame-too-large."""
    body = b'{"pad":"' + b"x" * (MAX_FRAME - 10) + b'"}'
    assert len(body) == MAX_FRAME
    assert check_control_stream(_frame(body))[0] == {"pad": "x" * (MAX_FRAME - 10)}
    body = body[:-2] + b'x"}'
    assert check_control_stream(_frame(body)) == [("error", "frame-too-large")]


@seeded
@fuzz_settings()
@given(data=streams, limit=LIMITS)
def test_control_stream_fuzz(data: bytes, limit: int) -> None:
    check_control_stream(data, limit)


@seeded
@fuzz_settings()
@given(body=st.one_of(fuzz_bytes([s[4:] for s in STREAM_SEEDS if len(s) > 4]), json_values.map(lambda v: json.dumps(v).encode())))
def test_control_decode_fuzz(body: bytes) -> None:
    check_control_decode(body)


@seeded
@fuzz_settings()
@given(header=st.binary(min_size=4, max_size=4), limit=st.integers(0, 2**32) | LIMITS)
def test_control_frame_length_fuzz(header: bytes, limit: int) -> None:
    check_frame_length(header, limit)


@seeded
@fuzz_settings(weight=0.5)
@given(obj=json_objects, limit=LIMITS)
def test_control_encode_round_trip(obj: dict, limit: int) -> None:
    """``encode`` never builds a frame over its limit, and ``decode`` gives the object back."""
    try:
        frame = protocol.encode(obj, limit)
    except ValueError:
        assert len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")) > limit
        return
    assert len(frame) - 4 <= limit and struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert protocol.decode(frame[4:]) == obj


def _recv_first(data: bytes, limit: int):
    a, b = socket.socketpair()
    try:
        b.settimeout(5)
        writer = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
        writer.start()
        try:
            return protocol.recv_frame(b, limit)
        except ControlError as exc:
            return ("error", exc.reason)
        except ConnectionError:
            return ("closed",)
        finally:
            writer.join(5)
    finally:
        a.close()
        b.close()


@seeded
@fuzz_settings(weight=0.5)
@given(data=streams, limit=LIMITS)
def test_control_recv_frame_fuzz(data: bytes, limit: int) -> None:
    """The client side reads the first frame as the reference does; a stream that ends early
    is the documented ``ConnectionError`` ("the daemon closed the connection")."""
    got = _recv_first(data, limit)
    want = reference_frames(data, limit)[0]
    if want in (("end",), ("error", "truncated-frame")):
        assert got == ("closed",), got
    else:
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), (got, want)
