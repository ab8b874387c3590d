"""``cr.*`` ops of the users' local socket (``cr_socket``): xos-cr inside a session on the node.

The socket is served by the same :class:`~xos_sshd.control.server.ControlServer` code as the
root-only control socket (framing, limits, ``SO_PEERCRED``), as a second instance with this
table only: no root-only op is reachable through it, whatever its file mode (0666).

The caller is the peer's uid, mapped back to its VO identity through the AMS
(:meth:`AMS.mapping_for_uid`): a uid that no mapping owns (root included) gets
``permission-denied``, a banned mapping ``banned``.  Every op but ``get``/``put`` is
:meth:`CRService.handle` with ``op`` = the name after ``cr.``.

``cr.get {image}`` and ``cr.put {}`` carry one descriptor with ``SCM_RIGHTS``: the client
opens the file *as itself* (``get``: a regular file open for writing, the archive is written
to it from its current offset; ``put``: a regular file open for reading, the archive is read
from it), so the daemon never opens a user path.  ``get`` -> ``{image, bytes}``, ``put`` ->
``{image}``.

``cr.migrate-out {job, mode}`` and ``cr.migrate-in {mode}`` carry one connected unix stream
socket (SCM_RIGHTS): the migration (:mod:`xos_sshd.cr.migrate`) runs over it after the reply,
so ``xos-cr migrate`` works from inside a session on the source (or target) node too.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import stat
from typing import Any

from ..control.protocol import ControlError, error_reply
from ..control.server import ANY, Op, Request
from .service import Caller, CRService

#: Per-op time limits (the control server's wait_for); CRIU ops may take long.
TIMEOUTS = {'run': 120.0, 'checkpoint': 900.0, 'restart': 900.0, 'kill': 60.0, 'logs': 60.0}
SIMPLE_OPS = ('run', 'list', 'logs', 'kill', 'checkpoint', 'restart', 'images', 'image', 'rm',
              'imported', 'caps')


async def caller_of(req: Request) -> Caller:
    """The peer's uid as a :class:`Caller`, or ``permission-denied``."""
    from .images import Owner
    gateway = req.gateway
    record = await gateway.ams.mapping_for_uid(req.peer.uid) if req.peer.uid != 0 else None
    refusal = None
    if record is None:
        refusal = ControlError('permission-denied', f'uid {req.peer.uid} is not a VO account '
                               'mapped on this node: only mapped users have jobs here')
    elif record.banned:
        refusal = ControlError('banned', f'account {record.account.name} is banned')
    if refusal is not None:  # audited as the cr service audits its own refusals
        gateway.audit.write('cr', action=req.op.removeprefix('cr.'), outcome='refused',
                            reason=refusal.reason, message=str(refusal), route='local',
                            source=f'pid {req.peer.pid}', peer_uid=req.peer.uid,
                            account=record.account.name if record else None)
        raise refusal
    account = record.account
    return Caller(Owner(account.vo, account.vo_user), account, 'local', f'pid {req.peer.pid}')


def _service(req: Request) -> CRService:
    service = getattr(req.gateway, 'cr', None)
    if service is None:
        raise ControlError('criu-unavailable', 'checkpoint/restart is not enabled on this node')
    return service


def _simple(name: str) -> Any:
    async def handler(req: Request) -> dict[str, Any]:
        caller = await caller_of(req)
        return await _service(req).handle(caller, {**req.args, 'op': name})
    handler.__name__ = f'cr_{name}'
    return handler


def _one_fd(req: Request, writable: bool) -> int:
    """The request's one descriptor: a regular file, open for writing (get) or reading (put)."""
    if len(req.fds) != 1:
        raise ControlError('bad-request', f'{req.op} needs exactly one file descriptor '
                           f'(SCM_RIGHTS), got {len(req.fds)}')
    fd = req.fds[0]
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ControlError('bad-request', f'{req.op}: the descriptor is not a regular file')
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if writable and mode not in (os.O_WRONLY, os.O_RDWR):
        raise ControlError('bad-request', 'get: the descriptor is not open for writing')
    if not writable and mode not in (os.O_RDONLY, os.O_RDWR):
        raise ControlError('bad-request', 'put: the descriptor is not open for reading')
    return req.fds.pop(0)


def _copy_to_fd(path: str, fd: int) -> int:
    """Copy the archive at *path* (root's own file) into the user's descriptor."""
    total = 0
    with open(path, 'rb') as src:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                total += n
    return total


async def cr_get(req: Request) -> dict[str, Any]:
    caller = await caller_of(req)
    service = _service(req)
    image_id = req.text('image', max_len=64)
    fd = _one_fd(req, writable=True)
    try:
        reply = await _refusal(service.export_archive(caller, image_id))
        if 'path' not in reply:
            return reply
        path = reply['path']
        try:
            written = await asyncio.to_thread(_copy_to_fd, str(path), fd)
        finally:
            await service.release_export(path)
    finally:
        os.close(fd)
    return {'image': image_id, 'bytes': written}


async def cr_put(req: Request) -> dict[str, Any]:
    caller = await caller_of(req)
    service = _service(req)
    fd = _one_fd(req, writable=False)
    with os.fdopen(fd, 'rb', buffering=1 << 20) as fileobj:
        reply = await _refusal(service.import_archive(caller, fileobj))
    if 'info' not in reply:
        return reply
    return {'image': reply['info'].as_dict()}


async def _refusal(coro: Any) -> dict[str, Any]:
    """Run a service call that raises the cr errors; turn them into a refusal reply."""
    from .images import ImageError
    from .jobs import JobError
    from .service import CRError
    try:
        result = await coro
    except (ImageError, JobError, CRError) as exc:
        return error_reply(exc.reason, str(exc))
    if isinstance(result, (str, os.PathLike)):
        return {'path': result}
    return {'info': result}


#: Migrations running on a descriptor a local client passed (kept referenced until done).
_STREAMS: set[asyncio.Future[Any]] = set()


def _stream_op(name: str) -> Any:
    async def handler(req: Request) -> dict[str, Any]:
        """``cr.migrate-out`` / ``cr.migrate-in`` with one connected unix stream socket
        (SCM_RIGHTS): once accepted, the migration's frames go over that socket (the
        client relays them to the other gateway), in the background of this reply."""
        from . import migrate
        from .pagestream import FrameStream
        caller = await caller_of(req)
        service = _service(req)
        if len(req.fds) != 1:
            raise ControlError('bad-request', f'{req.op} needs exactly one socket (SCM_RIGHTS)')
        if not stat.S_ISSOCK(os.fstat(req.fds[0]).st_mode):
            raise ControlError('bad-request', f'{req.op}: the descriptor is not a socket')
        sock = socket.socket(fileno=req.fds.pop(0))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ControlError('bad-request', f'{req.op}: not a unix stream socket')
        request = {**req.args, 'op': name}
        try:
            session = await migrate.prepare(service, caller, request)
        except Exception as exc:  # noqa: BLE001 (a refusal, answered)
            sock.close()
            return migrate.refusal(service, caller, request, exc)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=4 << 20)

        async def run() -> None:
            try:
                await session.run(FrameStream(reader, writer))
            finally:
                writer.close()
        task = asyncio.ensure_future(run())
        _STREAMS.add(task)
        task.add_done_callback(_STREAMS.discard)
        return {'mode': session.mode, 'side': session.side}
    handler.__name__ = f'cr_{name.replace("-", "_")}'
    return handler


OPS: dict[str, Op] = {
    **{f'cr.{name}': Op(_simple(name), ANY, TIMEOUTS.get(name, 30.0)) for name in SIMPLE_OPS},
    'cr.get': Op(cr_get, ANY, 900.0),
    'cr.put': Op(cr_put, ANY, 900.0),
    'cr.migrate-out': Op(_stream_op('migrate-out'), ANY, 120.0),
    'cr.migrate-in': Op(_stream_op('migrate-in'), ANY, 120.0),
}
