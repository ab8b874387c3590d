"""Stdio plumbing for ssh-xos: remote output to local fds and local stdin to the channel.

Why threads: a blocking read/write per descriptor works for every kind of stdio (files,
/dev/null, pipes, terminals) and never switches O_NONBLOCK on a descriptor that is shared
with the parent shell. Flow control is explicit in both directions: the channel is paused
while local output is backed up, and stdin waits while the remote window is full, so
memory stays bounded for any amount of data.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import struct
import termios
import threading
from collections import deque

import asyncssh

EXIT_FAILURE = 255


def _write_all(fd: int, data: bytes) -> None:
    """Write everything, also to a descriptor that someone left non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


class Flow:
    """Pauses the channel while any local output is backed up; resumes when all drained."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel | None = None
        self._paused: set[int] = set()

    def pause(self, fd: int) -> None:
        if not self._paused and self.chan:
            self.chan.pause_reading()
        self._paused.add(fd)

    def resume(self, fd: int) -> None:
        self._paused.discard(fd)
        if not self._paused and self.chan:
            self.chan.resume_reading()

    def broken(self, fd: int) -> None:
        """A local output failed (EPIPE...): its data is dropped from now on.

        A broken stdout ends the session, as with ssh (`ssh-xos host cmd | head`); a broken
        stderr alone must not kill the command, so it only stops holding the channel back.
        """
        if fd == 1 and self.chan:
            self.chan.close()
        else:
            self.resume(fd)


class _Output:
    """Writes channel data to a local fd from a thread so a slow reader never blocks the loop.

    Above `HIGH` queued bytes the channel is paused (the SSH window then stops the remote);
    below `LOW` it resumes, so memory stays bounded however large the output is.
    """

    HIGH = 1 << 20
    LOW = 256 << 10

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, flow: Flow) -> None:
        self.fd, self._loop, self._flow = fd, loop, flow
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._paused = False
        self._closed = False
        self.broken = False
        self._thread = threading.Thread(target=self._run, name=f"ssh-xos-out{fd}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Queue data (event-loop thread)."""
        with self._cond:
            if self.broken or self._closed:
                return
            self._chunks.append(data)
            self._pending += len(data)
            pause = self._pending > self.HIGH and not self._paused
            if pause:
                self._paused = True
            self._cond.notify()
        if pause:
            self._flow.pause(self.fd)

    def finish(self) -> None:
        """No more data: let the thread drain what is queued, then wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                data = self._chunks.popleft()
            try:
                _write_all(self.fd, data)
            except OSError:
                with self._cond:
                    self.broken = True
                    self._chunks.clear()
                self._loop.call_soon_threadsafe(self._flow.broken, self.fd)
                return
            with self._cond:
                self._pending -= len(data)
                resume = self._paused and self._pending <= self.LOW
                if resume:
                    self._paused = False
            if resume:
                self._loop.call_soon_threadsafe(self._flow.resume, self.fd)


class Session(asyncssh.SSHClientSession[bytes]):
    """One SSH session channel: remote output to local fds, exit status collected."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flow: Flow) -> None:
        self._flow = flow
        self.stdout = _Output(1, loop, flow)
        self.stderr = _Output(2, loop, flow)
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.error: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan
        self._flow.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        out = self.stderr if datatype == asyncssh.EXTENDED_DATA_STDERR else self.stdout
        out.write(data)

    def eof_received(self) -> bool:
        return True  # keep our half open: stdin may still flow and exit-status is yet to come

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signame: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signame

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self._writable.set()
        if not self.done.done():
            self.done.set_result(None)

    async def send(self, data: bytes) -> bool:
        """Send stdin data, waiting while the remote window is full; False once closed."""
        await self._writable.wait()
        if self.done.done() or self.chan is None or self.chan.is_closing():
            return False
        self.chan.write(data)
        return True

    async def send_eof(self) -> None:
        if not self.done.done() and self.chan is not None and not self.chan.is_closing():
            self.chan.write_eof()

    def exit_code(self) -> int:
        """ssh's rule: the remote status; a remote signal gives 128+signo; else 255."""
        if self.exit_status is not None:
            return self.exit_status if 0 <= self.exit_status <= 255 else EXIT_FAILURE
        if self.exit_signal is not None:
            signo = getattr(signal, "SIG" + self.exit_signal.upper().removeprefix("SIG"), None)
            return 128 + int(signo) if signo is not None else EXIT_FAILURE
        if self.stdout.broken:
            return 128 + signal.SIGPIPE
        return EXIT_FAILURE


def pump_stdin(loop: asyncio.AbstractEventLoop, session: Session) -> None:
    """Thread body: copy fd 0 to the channel with back-pressure, then send EOF."""
    try:
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                asyncio.run_coroutine_threadsafe(session.send_eof(), loop).result()
                return
            if not asyncio.run_coroutine_threadsafe(session.send(data), loop).result():
                return
    except Exception:  # the loop or channel has gone away: nothing left to feed
        return


def term_size(fd: int) -> tuple[int, int, int, int]:
    """(columns, rows, pixel width, pixel height) of a terminal."""
    try:
        rows, cols, xpix, ypix = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return cols, rows, xpix, ypix
    except OSError:
        return 80, 24, 0, 0
