"""The migration stream: frames between two gateways, relayed by the user's xos-cr.

A migration (:mod:`xos_sshd.cr.migrate`) runs over two SSH channels the user's ``xos-cr``
opened with the user's own XOS-cert: ``migrate-out`` to the source gateway, ``migrate-in``
to the target.  After its JSON reply line each channel carries *frames*, and the client
copies every frame from one channel to the other (it reads them too, to tell the user what
happened).  No TCP port is opened anywhere: CRIU at either end gets one end of a
``socketpair`` as ``--ps-socket`` and the gateway bridges the other end to ``P`` frames.

Frame = 1 byte kind + 4 bytes big-endian length + payload (at most :data:`MAX_FRAME`):

=====  ========================================================================
``P``  bytes of CRIU's page-server protocol (either direction)
``p``  the sender's CRIU closed its end of the page stream
``A``  bytes of the signed image archive (source to target; see ``imagetar.py``)
``a``  end of the archive
``M``  one JSON object (at most 64 KiB): the steps, see :mod:`xos_sshd.cr.migrate`
``K``  keepalive (empty), every :data:`KEEPALIVE` seconds from each side
=====  ========================================================================

Everything that arrives is hostile: kinds, lengths and JSON are checked, the page bytes
only ever reach a CRIU running as the user, the archive goes through the image store's
strict reader and signature checks.  :class:`ArchiveFeed` and :class:`ArchiveWriter` adapt
the frames to the blocking file objects the tar reader and writer use in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct('>cI')
MAX_FRAME = 4 << 20
#: Page and archive bytes are sent in chunks of this size.
CHUNK = 4 << 20
MAX_MESSAGE = 64 << 10
KINDS = frozenset({b'P', b'p', b'A', b'a', b'M', b'K'})
#: Each side sends a ``K`` frame this often, so that a long quiet step (a big dump before
#: its archive) is not taken for a dead stream.
KEEPALIVE = 30.0
#: A stream that moves no frame for this long is dead (a frozen job must not wait forever).
IDLE_TIMEOUT = 120.0


class StreamError(Exception):
    """The stream broke or carried something it must not.  ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(kind: bytes, payload: bytes | memoryview = b'') -> bytes:
    """One frame."""
    if kind not in KINDS or len(kind) != 1:
        raise ValueError(f'unknown frame kind {kind!r}')
    if len(payload) > MAX_FRAME:
        raise ValueError(f'frame of {len(payload)} bytes')
    return HEADER.pack(kind, len(payload)) + bytes(payload)


def decode_message(payload: bytes) -> dict[str, Any]:
    """An ``M`` frame's JSON object (StreamError ``bad-stream`` otherwise)."""
    if len(payload) > MAX_MESSAGE:
        raise StreamError('bad-stream', f'a message of {len(payload)} bytes')
    try:
        obj = json.loads(payload.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StreamError('bad-stream', 'a message that is not UTF-8 JSON') from None
    if not isinstance(obj, dict) or not isinstance(obj.get('msg'), str):
        raise StreamError('bad-stream', 'a message without "msg"')
    return obj


class FrameStream:
    """Frames over one byte channel: *reader* has ``readexactly``, *writer* ``write``/
    ``drain`` (an asyncssh channel's streams or asyncio's).  Sends are serialised."""

    def __init__(self, reader: Any, writer: Any, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_timeout = idle_timeout
        self._send_lock = asyncio.Lock()
        self.sent = 0
        self.received = 0

    async def send(self, kind: bytes, payload: bytes | memoryview = b'') -> None:
        frame = encode(kind, payload)
        async with self._send_lock:
            self.writer.write(frame)
            await self.writer.drain()
        self.sent += len(payload)

    async def send_message(self, msg: str, **fields: Any) -> None:
        await self.send(b'M', json.dumps({'msg': msg, **fields}, separators=(',', ':'),
                                         default=str).encode())

    async def recv(self) -> tuple[bytes, bytes] | None:
        """The next frame ``(kind, payload)``, None at end of stream (between frames)."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(HEADER.size),
                                            self.idle_timeout)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise StreamError('bad-stream', 'the stream ended inside a frame header') from None
        except TimeoutError:
            raise StreamError('stream-timeout', f'nothing arrived for {self.idle_timeout:.0f} s '
                              '(is xos-cr still relaying?)') from None
        kind, size = HEADER.unpack(header)
        if kind not in KINDS or size > MAX_FRAME:
            raise StreamError('bad-stream', f'a frame of kind {kind!r} and {size} bytes')
        try:
            payload = await asyncio.wait_for(self.reader.readexactly(size), self.idle_timeout)
        except asyncio.IncompleteReadError:
            raise StreamError('bad-stream', 'the stream ended inside a frame') from None
        except TimeoutError:
            raise StreamError('stream-timeout', 'a frame stopped half-way') from None
        self.received += size
        return kind, payload

    async def keepalive(self) -> None:
        """Send ``K`` every :data:`KEEPALIVE` seconds until cancelled (or the stream fails)."""
        try:
            while True:
                await asyncio.sleep(KEEPALIVE)
                await self.send(b'K')
        except (OSError, ConnectionError, RuntimeError):
            pass
        except Exception:  # noqa: BLE001 (asyncssh's errors: the stream is gone)
            pass

    def close(self) -> None:
        try:
            if hasattr(self.writer, 'write_eof') and self.writer.can_write_eof():
                self.writer.write_eof()
        except (OSError, RuntimeError, AttributeError):
            pass


class SocketPump:
    """The gateway's end of a CRIU ``--ps-socket`` pair, bridged to ``P``/``p`` frames.

    :meth:`run` copies what CRIU writes into ``P`` frames (then one ``p``); :meth:`feed`
    writes a received ``P`` payload to CRIU, :meth:`feed_end` half-closes.  *charge*, when
    set, is told the size of each payload before it goes to CRIU and refuses it by raising
    (a page server writes them to disk: the account's quota, across all its streams).
    """

    def __init__(self, sock: socket.socket, stream: FrameStream,
                 charge: Callable[[int], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.stream = stream
        self.charge = charge
        self.fed = 0
        self.read = 0
        self.closed = False
        self.peer_ended = False  # the CRIU at the other end closed its page stream

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.sock, CHUNK)
            except (ConnectionError, OSError):
                data = b''
            if not data:
                break
            self.read += len(data)
            await self.stream.send(b'P', data)
        await self.stream.send(b'p')

    async def feed(self, data: bytes) -> None:
        if self.charge is not None:
            self.charge(len(data))
        self.fed += len(data)
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except (ConnectionError, OSError) as exc:
            raise StreamError('criu-gone', f'CRIU closed its page stream: {exc}') from None

    def feed_end(self) -> None:
        self.peer_ended = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """End the page stream for CRIU at once.  ``shutdown`` first: uvloop keeps a
        duplicate of a socket's descriptor while a ``sock_recv`` waits on it, so ``close``
        alone would leave CRIU waiting for data that never comes (measured)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class ArchiveFeed:
    """A blocking binary file (``read(n)``) fed from the event loop: the archive frames for
    the tar reader running in a worker thread.  :meth:`put` waits while more than
    :data:`MAX_BUFFERED` bytes are unread (flow control back to the stream)."""

    MAX_BUFFERED = 8 << 20

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._space = asyncio.Event()
        self._space.set()
        self._loop = asyncio.get_running_loop()

    async def put(self, data: bytes) -> None:
        await self._space.wait()
        with self._cond:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > self.MAX_BUFFERED:
                self._space.clear()
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        """No more data: end of file, or *error* raised by the reader's next read (once
        ended, later calls change nothing)."""
        with self._cond:
            if self._eof:
                return
            self._eof = True
            self._error = error
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof:
                self._cond.wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b''
            chunk = self._chunks.popleft()
            if 0 <= n < len(chunk):
                self._chunks.appendleft(chunk[n:])
                chunk = chunk[:n]
            self._buffered -= len(chunk)
            if self._buffered <= self.MAX_BUFFERED:
                self._loop.call_soon_threadsafe(self._space.set)
            return chunk


class ArchiveWriter:
    """A blocking binary file (``write``) for the tar writer in a worker thread: buffers
    :data:`CHUNK` bytes, sends each as an ``A`` frame through the event loop (waiting for
    it, so the stream's flow control reaches the writer)."""

    def __init__(self, stream: FrameStream, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.loop = loop
        self._buf = bytearray()
        self.written = 0

    def _send(self, data: bytes) -> None:
        asyncio.run_coroutine_threadsafe(self.stream.send(b'A', data), self.loop).result()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= CHUNK:
            self._send(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._send(bytes(self._buf))
            self._buf.clear()

    def tell(self) -> int:
        return self.written


async def cancel_quietly(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel *tasks* (None skipped) and wait until each has ended, whatever it raised."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        try:
            await task
        except BaseException:  # noqa: BLE001 (cancelled or failed: either way it is over)
            pass

