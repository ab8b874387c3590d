"""The control socket server: a unix socket in the gateway's event loop, one JSON request at a time.

Who may talk to it is decided twice: the socket file is 0600 root (a non-root process cannot
even connect), and every request is checked against the peer's credentials as the kernel
reports them (``SO_PEERCRED``, taken once when the connection is accepted), so an op marked
root-only stays root-only even if the socket is ever opened wider.  The users' ``cr.*`` ops
are served by a second instance of this server on a socket of their own (mode 0666, a table
with nothing else in it): the two tables never mix.

Hostile or broken clients cost little and affect nobody else: a frame is at most 64 KiB and
must arrive within 5 s of its first byte, an idle connection is closed after 30 s, a request
may run at most :attr:`Op.timeout` seconds, at most ``max_connections`` connections are served
at once, and any failure in one handler becomes an error reply on that connection only.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ams import MappingRefused
from ..auth.errors import AuthRefused
from ..tasks import cancel_and_wait
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
    #: Descriptors that came with this request (``SCM_RIGHTS``; cr socket only).  A handler
    #: that keeps one removes it from the list; the server closes the rest afterwards.
    fds: list[int] = field(default_factory=list)

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
    """The unix socket at *path*, dispatching ``op`` to *ops*; *context* is the gateway.

    One implementation serves both sockets of the gateway (``docs/internals.md``): the
    root-only control socket (mode 0600, ``max_fds=0``) and the users' checkpoint/restart
    socket (mode 0666, only ``cr.*`` ops, which may take descriptors passed with
    ``SCM_RIGHTS``: at most *max_fds* per request, every other one is closed on arrival).
    Connections are read with ``recvmsg`` on the raw socket (asyncio's streams would drop
    passed descriptors), through :class:`_Connection`.
    """

    def __init__(self, path: Path, ops: Mapping[str, Op], context: Any = None, *,
                 mode: int = 0o600, max_connections: int = 64,
                 frame_timeout: float = protocol.FRAME_TIMEOUT,
                 idle_timeout: float = protocol.IDLE_TIMEOUT, max_fds: int = 0,
                 name: str = 'control'):
        self.path = Path(path)
        self.ops = ops
        self.context = context
        self.mode = mode
        self.max_connections = max_connections
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.max_fds = max_fds
        self.name = name
        #: State shared by every connection of this server (e.g. recent PAM authentications).
        self.shared: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket (its mode set before it accepts anything) and start serving."""
        path = self.path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _check_parent(path.parent)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            # Not listening yet: nobody can connect before the mode is right.
            os.chmod(path, self.mode)
            os.chown(path, 0, 0)
            st = os.lstat(path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._acceptor = asyncio.create_task(self._accept_loop(sock))
        log.info('%s socket listening on %s', self.name, path)

    async def close(self) -> None:
        """Stop accepting, drop live connections, remove the socket file."""
        if self._sock is None:
            return
        await cancel_and_wait(self._acceptor)
        self._sock.close()
        self._sock = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for conn in list(self._conns):
            conn.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                raw, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off, never stop serving
                log.error('%s socket: accept failed: %s', self.name, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._client(_Connection(loop, raw, self.max_fds)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- one connection -------------------------------------------------------------------

    async def _client(self, conn: '_Connection') -> None:
        if len(self._conns) >= self.max_connections:
            await self._send(conn, protocol.error_reply(
                'busy', f'too many {self.name} connections (limit {self.max_connections})'))
            conn.close()
            return
        self._conns.add(conn)
        try:
            peer = conn.peer()
            state: dict[str, Any] = {}
            while True:
                try:
                    message = await protocol.read_frame(conn, idle_timeout=self.idle_timeout,
                                                        frame_timeout=self.frame_timeout)
                except ControlError as exc:
                    log.warning('%s: %s from pid %d uid %d: %s', self.name, exc.reason, peer.pid,
                                peer.uid, exc)
                    if exc.reason != 'truncated-frame':
                        await self._send(conn, exc.reply())
                    if exc.fatal:
                        break
                    conn.drop_fds()
                    continue
                if message is None:
                    break
                if not await self._send(conn, await self._dispatch(message, peer, state,
                                                                    conn.take_fds())):
                    break
        except (ConnectionError, OSError) as exc:
            log.debug('%s connection ended: %s', self.name, exc)
        except asyncio.CancelledError:
            pass
        except Exception:  # never let one client take the server down
            log.exception('%s connection failed', self.name)
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _dispatch(self, message: dict[str, Any], peer: Peer, conn: dict[str, Any],
                        fds: list[int] | None = None) -> dict[str, Any]:
        fds = fds or []
        try:
            return await self._dispatch_op(message, peer, conn, fds)
        finally:
            for fd in fds:  # whatever the handler did not take
                try:
                    os.close(fd)
                except OSError:
                    pass

    async def _dispatch_op(self, message: dict[str, Any], peer: Peer, conn: dict[str, Any],
                           fds: list[int]) -> dict[str, Any]:
        op = message.get('op')
        if not isinstance(op, str):
            return protocol.error_reply('bad-request', 'request lacks a string "op"')
        spec = self.ops.get(op)
        if spec is None:
            return protocol.error_reply('unknown-op', f'unknown op {op[:64]!r}')
        if spec.privilege == ROOT and peer.uid != 0:
            log.warning('%s: uid %d (pid %d) asked root-only op %s', self.name, peer.uid,
                        peer.pid, op)
            audit = getattr(self.context, 'audit', None)
            if audit is not None:
                audit.write('control', action=op, outcome='refused', reason='permission-denied',
                            message=f'{op} is for root only', socket=self.name, pid=peer.pid,
                            peer_uid=peer.uid)
            return protocol.error_reply('permission-denied', f'{op} is for root only')
        request = Request(op, message, peer, conn, self, fds)
        try:
            result = await asyncio.wait_for(spec.handler(request), spec.timeout)
        except ControlError as exc:
            return exc.reply()
        except (AuthRefused, MappingRefused) as exc:
            return protocol.error_reply(exc.reason, str(exc))
        except TimeoutError:
            log.error('%s: %s did not finish within %g s', self.name, op, spec.timeout)
            return protocol.error_reply('timeout', f'{op} did not finish within {spec.timeout:g} s')
        except Exception:
            log.exception('%s: %s failed', self.name, op)
            return protocol.error_reply('internal-error', f'{op} failed inside xos-sshd (see its log)')
        if result.get('ok') is False:  # a handler that answers refusals itself (cr.*)
            return result
        return {'ok': True, **result}

    async def _send(self, conn: '_Connection', reply: dict[str, Any]) -> bool:
        """Write one reply; False when the client does not take it in time."""
        try:
            frame = protocol.encode(reply, protocol.MAX_REPLY)
        except ValueError as exc:
            frame = protocol.encode(protocol.error_reply('reply-too-large', str(exc)))
        try:
            await conn.send(frame, self.frame_timeout)
        except (TimeoutError, ConnectionError, OSError):
            conn.close()
            return False
        return True


class _Connection:
    """One accepted connection, read with ``recvmsg`` so that descriptors passed with
    ``SCM_RIGHTS`` are seen: kept (close-on-exec) up to *max_fds* until the next request
    takes them, closed at once beyond that or on a server that takes none.

    Offers the two reads :func:`protocol.read_frame` needs (``read``, ``readexactly``).
    """

    _ANCILLARY = socket.CMSG_SPACE(16 * 4)

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, max_fds: int):
        self._loop = loop
        self.sock = sock
        sock.setblocking(False)
        self._max_fds = max_fds
        self._buf = bytearray()
        self._eof = False
        self._fds: list[int] = []
        self._closed = False

    def peer(self) -> Peer:
        pid, uid, gid = _PEERCRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_PEERCRED,
                                                              _PEERCRED.size))
        return Peer(pid, uid, gid)

    async def _readable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def _fill(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    65536, self._ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            self._keep_fds(ancdata)
            if data:
                self._buf += data
            else:
                self._eof = True
            return

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array('i')
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                if len(self._fds) < self._max_fds:
                    self._fds.append(fd)
                else:
                    os.close(fd)

    async def read(self, n: int) -> bytes:
        if not self._buf and not self._eof:
            await self._fill()
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof:
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            await self._fill()
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    async def send(self, data: bytes, timeout: float) -> None:
        await asyncio.wait_for(self._loop.sock_sendall(self.sock, data), timeout)

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def drop_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.drop_fds()
        self.sock.close()


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
