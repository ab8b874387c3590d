"""The SSH subsystems of checkpoint/restart: ``xos-cr`` (JSON lines) and ``xos-images`` (SFTP).

Both run in the gateway process on the session channel (no child process: the caller is
the SSH-authenticated identity and its account, fixed at login), through asyncssh's stream
session, which :class:`~xos_sshd.session.channel.UserSession` hands the channel to when the
client asks for one of these subsystems.

``xos-cr``: one JSON object per line in, one per line out, in order.  A line is at most
:data:`MAX_LINE` bytes (the newline excluded); a longer one, a line that is not UTF-8 JSON,
or JSON that is not an object is answered ``{"ok": false, "reason": "bad-request", ...}``
and the session goes on.  Requests are :meth:`CRService.handle`'s (``{"op": "list"}``...);
``op`` may also carry the local socket's ``cr.`` prefix.  End of input ends the session
(exit status 0) once every reply is sent.

``migrate-out`` and ``migrate-in`` (:mod:`xos_sshd.cr.migrate`) are answered like any op;
once accepted (``{"ok": true, "mode": M, "side": "source"|"target"}``), the channel carries
the migration's frames (:mod:`xos_sshd.cr.pagestream`) until the migration ends, and its exit
status says how it ended (0 done, 1 failed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from ..control.protocol import error_reply
from . import migrate
from .migrate import STREAM_OPS
from .pagestream import FrameStream
from .service import Caller, CRService

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
SUBSYSTEM_CR = 'xos-cr'
SUBSYSTEM_IMAGES = 'xos-images'
_INTERRUPTIONS = (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged)


def _decode(line: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(request, None)``, or ``(None, error reply)`` for a line that is not one."""
    try:
        obj = json.loads(line.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, error_reply('bad-request', 'a request line must be one UTF-8 JSON object')
    if not isinstance(obj, dict):
        return None, error_reply('bad-request', f'a request must be a JSON object, not '
                                 f'{type(obj).__name__}')
    return obj, None


async def serve_lines(service: CRService, caller: Caller, stdin: asyncssh.SSHReader[bytes],
                      stdout: asyncssh.SSHWriter[bytes]) -> None:
    """The ``xos-cr`` subsystem: read request lines until EOF, answer each in order."""

    async def answer(reply: dict[str, Any]) -> None:
        stdout.write(json.dumps(reply, separators=(',', ':'), ensure_ascii=False,
                                default=str).encode() + b'\n')
        await stdout.drain()

    async def one(line: bytes) -> Any:
        """Answer one line; a migration stream op that was accepted is returned instead."""
        # The limit is on the line as sent (before stripping), the same however it was read.
        if len(line.rstrip(b'\r')) > MAX_LINE:
            await answer(error_reply('bad-request', f'request line longer than {MAX_LINE} bytes'))
            return None
        line = line.strip()
        if not line:
            return None
        request, refusal = _decode(line)
        if request is not None and str(request.get('op', '')).removeprefix('cr.') in STREAM_OPS:
            try:
                session = await migrate.prepare(service, caller, request)
            except Exception as exc:  # noqa: BLE001 (answered; the line session goes on)
                await answer(migrate.refusal(service, caller, request, exc))
                return None
            await answer({'ok': True, 'mode': session.mode, 'side': session.side})
            return session
        await answer(refusal if request is None else await service.handle(caller, request))
        return None

    buf = bytearray()
    skipping = False  # inside a line already refused as too long
    try:
        while True:
            try:
                data = await stdin.read(65536)
            except _INTERRUPTIONS:
                continue
            if not data:
                break
            buf += data
            while True:
                end = buf.find(b'\n')
                if end < 0:
                    if len(buf) > MAX_LINE:
                        if not skipping:
                            await answer(error_reply(
                                'bad-request', f'request line longer than {MAX_LINE} bytes'))
                        skipping = True
                        buf.clear()
                    break
                line = bytes(buf[:end])
                del buf[:end + 1]
                if skipping:  # the rest of the refused line
                    skipping = False
                    continue
                session = await one(line)
                if session is not None:
                    # The channel is a migration stream from here on (cr/pagestream.py).
                    status = await session.run(FrameStream(_Prefixed(bytes(buf), stdin), stdout))
                    stdout.channel.exit(status)
                    return
        if buf and not skipping:
            await one(bytes(buf))
    except (asyncssh.BreakReceived, ConnectionError, asyncssh.DisconnectError) as exc:
        log.debug('xos-cr subsystem of %s ended: %s', caller.account.name, exc)
        return
    stdout.channel.exit(0)


class _Prefixed:
    """*reader* with *prefix* (bytes already read past the request line) in front of it."""

    def __init__(self, prefix: bytes, reader: asyncssh.SSHReader[bytes]) -> None:
        self.prefix = prefix
        self.reader = reader

    async def readexactly(self, n: int) -> bytes:
        if not self.prefix:
            while True:
                try:
                    return await self.reader.readexactly(n)
                except _INTERRUPTIONS:
                    continue
        head, self.prefix = self.prefix[:n], self.prefix[n:]
        if len(head) == n:
            return head
        try:
            return head + await self.reader.readexactly(n - len(head))
        except asyncio.IncompleteReadError as exc:
            raise asyncio.IncompleteReadError(head + exc.partial, n) from None


def cr_session(service: CRService, caller: Caller) -> SSHServerStreamSession[bytes]:
    """An asyncssh stream session serving ``xos-cr`` for *caller*."""
    return SSHServerStreamSession(lambda stdin, stdout, _stderr: serve_lines(
        service, caller, stdin, stdout))


def images_session(service: CRService, caller: Caller,
                   upload_dir: Path) -> SSHServerStreamSession[bytes]:
    """An asyncssh stream session serving ``xos-images`` (SFTP) for *caller*."""
    from asyncssh.sftp import run_sftp_server

    from .sftp import ImagesSFTPServer

    def handler(stdin: Any, stdout: Any, _stderr: Any) -> Any:
        server = ImagesSFTPServer(stdout.channel, service, caller, upload_dir)
        return run_sftp_server(server, stdin, stdout, 3)

    return SSHServerStreamSession(handler)


def subsystems(service: CRService, caller_of: Callable[[Any], Caller],
               upload_dir: Path) -> dict[str, Callable[[Any], SSHServerStreamSession[bytes]]]:
    """The subsystem table a session gets: name -> factory(session context)."""
    return {
        SUBSYSTEM_CR: lambda ctx: cr_session(service, caller_of(ctx)),
        SUBSYSTEM_IMAGES: lambda ctx: images_session(service, caller_of(ctx), upload_dir),
    }
