"""The control socket server: a unix socket in the gateway's event loop, one JSON request at a time.

Who may talk to it is decided twice: the socket file is 0600 root (a non-root process cannot
even connect), and every request is checked against the peer's credentials as the kernel
reports them (``SO_PEERCRED``, taken once when the connection is accepted), so an op marked
root-only stays root-only even if the socket is ever opened wider for the user ops.

Hostile or broken clients cost little and affect nobody else: a frame is at most 64 KiB and
must arrive within 5 s of its first byte, an idle connection is closed after 30 s, a request
may run at most :attr:`Op.timeout` seconds, at most ``max_connections`` connections are served
at once, and any failure in one handler becomes an error reply on that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ams import MappingRefused
from ..auth.errors import AuthRefused
from . import protocol
from .protocol import ControlError

log = logging.getLogger(__name__)

#: Privilege levels of an op: ``ROOT`` ops refuse every peer but uid 0; ``ANY`` ops serve
#: every peer that can connect, as itself (the handler acts for ``request.peer.uid``).
ROOT = 'root'
ANY = 'any'

_PEERCRED = struct.Struct('3i')


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int


@dataclass
class Request:
    """One request, as a handler sees it."""

    op: str
    args: dict[str, Any]
    peer: Peer
    conn: dict[str, Any]          # state that lives as long as this connection (PAM nonce)
    server: 'ControlServer'

    @property
    def gateway(self) -> Any:
        """The :class:`~xos_sshd.gateway.Gateway` this server belongs to."""
        return self.server.context

    def text(self, key: str, *, required: bool = True, max_len: int = 256,
             default: str | None = None) -> Any:
        """The string field *key* (``bad-request`` if missing, not a string or too long)."""
        value = self.args.get(key)
        if value is None:
            if required:
                raise ControlError('bad-request', f'{self.op}: field {key!r} is required')
            return default
        if not isinstance(value, str) or len(value) > max_len or '\0' in value:
            raise ControlError('bad-request',
                               f'{self.op}: field {key!r} must be a string of at most {max_len} characters')
        return value

    def flag(self, key: str, default: bool) -> bool:
        """The boolean field *key*."""
        value = self.args.get(key, default)
        if not isinstance(value, bool):
            raise ControlError('bad-request', f'{self.op}: field {key!r} must be true or false')
        return value

    def number(self, key: str, *, required: bool = True) -> int | None:
        """The non-negative integer field *key*."""
        value = self.args.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise ControlError('bad-request', f'{self.op}: field {key!r} must be a uid-sized integer')
        return value


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Op:
    """One entry of the dispatch table."""

    handler: Handler
    privilege: str = ROOT
    timeout: float = 30.0


class ControlServer:
    """The unix socket at *path*, dispatching ``op`` to *ops*; *context* is the gateway."""

    def __init__(self, path: Path, ops: Mapping[str, Op], context: Any = None, *,
                 mode: int = 0o600, max_connections: int = 64,
                 frame_timeout: float = protocol.FRAME_TIMEOUT,
                 idle_timeout: float = protocol.IDLE_TIMEOUT):
        self.path = Path(path)
        self.ops = ops
        self.context = context
        self.mode = mode
        self.max_connections = max_connections
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        #: State shared by every connection of this server (e.g. recent PAM authentications).
        self.shared: dict[str, Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket (0600 before it accepts anything) and start serving."""
        path = self.path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _check_parent(path.parent)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Not listening yet: nobody can connect before the mode is right.
            os.chmod(path, self.mode)
            os.chown(path, 0, 0)
            st = os.lstat(path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._client, sock=sock)
        except BaseException:
            sock.close()
            raise
        log.info('control socket listening on %s', path)

    async def close(self) -> None:
        """Stop accepting, drop live connections, remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        except TimeoutError:
            pass
        self._server = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # --- one connection -------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            await self._send(writer, protocol.error_reply(
                'busy', f'too many control connections (limit {self.max_connections})'))
            writer.close()
            return
        self._writers.add(writer)
        try:
            peer = _peer_of(writer)
            conn: dict[str, Any] = {}
            while True:
                try:
                    message = await protocol.read_frame(reader, idle_timeout=self.idle_timeout,
                                                        frame_timeout=self.frame_timeout)
                except ControlError as exc:
                    log.warning('control: %s from pid %d uid %d: %s', exc.reason, peer.pid, peer.uid, exc)
                    if exc.reason != 'truncated-frame':
                        await self._send(writer, exc.reply())
                    if exc.fatal:
                        break
                    continue
                if message is None:
                    break
                if not await self._send(writer, await self._dispatch(message, peer, conn)):
                    break
        except (ConnectionError, OSError) as exc:
            log.debug('control connection ended: %s', exc)
        except Exception:  # never let one client take the server down
            log.exception('control connection failed')
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _dispatch(self, message: dict[str, Any], peer: Peer, conn: dict[str, Any]) -> dict[str, Any]:
        op = message.get('op')
        if not isinstance(op, str):
            return protocol.error_reply('bad-request', 'request lacks a string "op"')
        spec = self.ops.get(op)
        if spec is None:
            return protocol.error_reply('unknown-op', f'unknown op {op[:64]!r}')
        if spec.privilege == ROOT and peer.uid != 0:
            log.warning('control: uid %d (pid %d) asked root-only op %s', peer.uid, peer.pid, op)
            return protocol.error_reply('permission-denied', f'{op} is for root only')
        request = Request(op, message, peer, conn, self)
        try:
            result = await asyncio.wait_for(spec.handler(request), spec.timeout)
        except ControlError as exc:
            return exc.reply()
        except (AuthRefused, MappingRefused) as exc:
            return protocol.error_reply(exc.reason, str(exc))
        except TimeoutError:
            log.error('control: %s did not finish within %g s', op, spec.timeout)
            return protocol.error_reply('timeout', f'{op} did not finish within {spec.timeout:g} s')
        except Exception:
            log.exception('control: %s failed', op)
            return protocol.error_reply('internal-error', f'{op} failed inside xos-sshd (see its log)')
        return {'ok': True, **result}

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
        """Write one reply; False when the client does not take it in time."""
        try:
            frame = protocol.encode(reply, protocol.MAX_REPLY)
        except ValueError as exc:
            frame = protocol.encode(protocol.error_reply('reply-too-large', str(exc)))
        try:
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), self.frame_timeout)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
            return False
        return True


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info('socket')
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _PEERCRED.size))
    return Peer(pid, uid, gid)


def _check_parent(directory: Path) -> None:
    """Refuse a directory where someone else could swap the socket for their own."""
    st = os.stat(directory)
    if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise OSError(f'control socket directory {directory} must be owned by root and '
                      f'not writable by others')


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a dead gateway; refuse to replace a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f'{path} exists and is not a socket')
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info('removed stale control socket %s', path)
        return
    except OSError as exc:
        raise OSError(f'cannot check control socket {path}: {exc.strerror or exc}') from None
    finally:
        probe.close()
    raise OSError(f'another xos-sshd is already serving {path}')
