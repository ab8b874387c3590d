"""Non-blocking plumbing between an SSH channel and a child's pty or pipes.

The event loop watches the descriptors directly (``add_reader``/``add_writer``), which works
the same for pipes, pty masters and pidfds on both asyncio's loop and uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Callable

READ_SIZE = 65536
HIGH_WATER = 256 * 1024


class FdReader:
    """Reads an fd whenever it is readable and hands the bytes on; ``on_eof`` once at the end.

    A pty master reports the end with EIO (every slave closed), a pipe with an empty read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_data: Callable[[bytes], None], on_eof: Callable[[], None],
                 close_fd: bool = True):
        self._loop = loop
        self.fd = fd
        self._close_fd = close_fd
        self._on_data = on_data
        self._on_eof = on_eof
        self._watching = False
        self.at_eof = False
        os.set_blocking(fd, False)
        self.resume()

    def pause(self) -> None:
        """Stop reading (the channel's window is full)."""
        if self._watching:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def resume(self) -> None:
        """Read again."""
        if not self._watching and not self.at_eof:
            self._loop.add_reader(self.fd, self._readable)
            self._watching = True

    def close(self) -> None:
        """Stop for good and release the fd (when it is ours)."""
        self.pause()
        self.at_eof = True
        if self._close_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def drain(self) -> None:
        """Read whatever is already buffered (the child exited; take its last words)."""
        while not self.at_eof and self._read_once():
            pass

    def _readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b''
        if data:
            self._on_data(data)
            return True
        self._finish()
        return False

    def _finish(self) -> None:
        self.pause()
        self.at_eof = True
        self._on_eof()


class FdWriter:
    """Buffers writes to a non-blocking fd and flushes them as it becomes writable.

    ``on_pressure(True)`` is called when the buffer passes the high-water mark (the caller
    stops reading the SSH channel), ``on_pressure(False)`` once it has drained.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_pressure: Callable[[bool], None], close_fd: bool = True):
        self._loop = loop
        self.fd = fd
        self._on_pressure = on_pressure
        self._close_fd = close_fd
        self._buffer = bytearray()
        self._close_when_drained = False
        self._pressured = False
        self.closed = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        """Queue *data*; dropped silently once the reader has gone (the child closed its end)."""
        if self.closed or self._close_when_drained:
            return
        if not self._buffer:
            data = self._write_now(data)
            if self.closed or not data:
                return
            self._loop.add_writer(self.fd, self._writable)
        self._buffer += data
        if len(self._buffer) > HIGH_WATER and not self._pressured:
            self._pressured = True
            self._on_pressure(True)

    def close_when_drained(self) -> None:
        """EOF from the client: close our end once everything queued is written."""
        self._close_when_drained = True
        if not self._buffer:
            self.close()

    def close(self) -> None:
        """Stop writing and release the fd."""
        if self.closed:
            return
        self.closed = True
        if self._buffer:
            self._loop.remove_writer(self.fd)
            self._buffer.clear()
        if self._close_fd:
            os.close(self.fd)

    def _write_now(self, data: bytes) -> bytes:
        """Write what the fd takes now; return the rest."""
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            return data
        except OSError:
            # EPIPE/EIO: the child is gone or closed stdin; nothing will read the rest.
            self.close()
            return b''
        return data[written:]

    def _writable(self) -> None:
        rest = self._write_now(bytes(self._buffer))
        if self.closed:
            return
        self._buffer = bytearray(rest)
        if rest:
            return
        self._loop.remove_writer(self.fd)
        if self._pressured:
            self._pressured = False
            self._on_pressure(False)
        if self._close_when_drained:
            self.close()
