"""The control socket's wire format: length-prefixed JSON objects, with hard limits.

A frame is a 4-byte big-endian length, then that many bytes of one UTF-8 JSON object.
A request is at most :data:`MAX_FRAME` bytes and must arrive whole within
:data:`FRAME_TIMEOUT` seconds of its first byte; a connection that sends nothing for
:data:`IDLE_TIMEOUT` seconds is closed.  Replies may be larger (an admin listing of many
mappings), up to :data:`MAX_REPLY`.  The same functions serve the daemon (asyncio) and the
clients (blocking sockets), so both sides enforce the same limits.

Request ``{"op": "...", ...}``; reply ``{"ok": true, ...}`` or
``{"ok": false, "reason": "code", "error": "one human line"}`` (:func:`error_reply`, which
passes the message through :func:`one_line`, the one sanitiser of peer text: a message may
quote what a client sent).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

MAX_FRAME = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024
FRAME_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0
#: At most this many characters of a refusal's ``error``.
MAX_ERROR = 1000
_HEADER = struct.Struct('>I')


class ControlError(Exception):
    """A refused request: ``reason`` is the stable code sent as ``reason``, the message as ``error``.

    ``fatal`` errors (a frame that broke the framing) close the connection after the reply.
    """

    def __init__(self, reason: str, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal

    def reply(self) -> dict[str, Any]:
        return error_reply(self.reason, str(self))


def error_reply(reason: str, message: str) -> dict[str, Any]:
    """The one shape of a refusal (the message through :func:`one_line`)."""
    return {'ok': False, 'reason': reason, 'error': one_line(message, MAX_ERROR)}


def one_line(text: Any, limit: int = 500) -> str:
    """*text* made fit for one log line, audit field, reply or terminal line: every control
    or format character (line breaks, terminal escapes, NULs, C1 controls, bidi overrides...)
    becomes a space, runs of whitespace one space, and at most *limit* characters are kept.
    The one sanitiser for text that comes from a peer (a client of either socket, a peer
    gateway, the gateway as seen by ``xos-cr``): standard library only, like this module."""
    text = str(text)[:limit * 4]
    text = ''.join(c if c.isprintable() else ' ' for c in text)
    return ' '.join(text.split())[:limit]


def encode(obj: dict[str, Any], limit: int = MAX_FRAME) -> bytes:
    """One frame holding *obj*; ``ValueError`` if it would exceed *limit* bytes."""
    body = json.dumps(obj, separators=(',', ':'), ensure_ascii=False, default=str).encode('utf-8')
    if len(body) > limit:
        raise ValueError(f'frame of {len(body)} bytes exceeds the limit of {limit}')
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object of one frame's body; ``ControlError('bad-request')`` otherwise."""
    try:
        obj = json.loads(body.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError('bad-request', 'frame is not UTF-8 JSON') from None
    if not isinstance(obj, dict):
        raise ControlError('bad-request', f'frame holds a JSON {type(obj).__name__}, not an object')
    return obj


def frame_length(header: bytes, limit: int) -> int:
    """The body length announced by *header*; ``frame-too-large`` (fatal) beyond *limit*."""
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ControlError('frame-too-large',
                           f'frame of {length} bytes exceeds the limit of {limit}', fatal=True)
    return length


async def read_frame(reader: asyncio.StreamReader, *, idle_timeout: float = IDLE_TIMEOUT,
                     frame_timeout: float = FRAME_TIMEOUT,
                     limit: int = MAX_FRAME) -> dict[str, Any] | None:
    """Read one request; ``None`` at a clean end of stream (or idle timeout).

    Raises :class:`ControlError`: ``frame-too-large`` and ``frame-timeout`` are fatal (the
    stream can no longer be trusted to be in step), ``bad-request`` is not.
    """
    try:
        first = await asyncio.wait_for(reader.read(1), idle_timeout)
    except TimeoutError:
        return None
    if not first:
        return None
    deadline = time.monotonic() + frame_timeout
    try:
        header = first + await asyncio.wait_for(reader.readexactly(_HEADER.size - 1),
                                                deadline - time.monotonic())
        length = frame_length(header, limit)
        body = await asyncio.wait_for(reader.readexactly(length), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ControlError('frame-timeout', f'frame not complete within {frame_timeout:g} s',
                           fatal=True) from None
    except asyncio.IncompleteReadError:
        raise ControlError('truncated-frame', 'connection closed in the middle of a frame',
                           fatal=True) from None
    return decode(body)


# --- blocking side (clients) --------------------------------------------------------------

def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Send one request frame (at most :data:`MAX_FRAME`)."""
    sock.sendall(encode(obj))


def recv_frame(sock: socket.socket, limit: int = MAX_REPLY) -> dict[str, Any]:
    """Receive one reply frame (the socket's timeout bounds each wait)."""
    length = frame_length(_recv_exactly(sock, _HEADER.size), limit)
    return decode(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError('the daemon closed the connection')
        chunks.append(chunk)
        n -= len(chunk)
    return b''.join(chunks)
