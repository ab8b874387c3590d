"""Migration, gateway side: ``migrate-out`` at the source, ``migrate-in`` at the target.

The user's ``xos-cr migrate`` (:mod:`xos_sshd.cr.migclient`) is logged in to both gateways
with the user's XOS-cert.  It asks each for ``caps`` (:mod:`xos_sshd.cr.migcaps`), picks a
mode, then opens one more ``xos-cr`` channel on each: ``{"op": "migrate-in", "mode": M}`` on
the target (first: a target that refuses, e.g. over quota, stops everything before the job
is touched), ``{"op": "migrate-out", "job": J, "mode": M}`` on the source.  After the ``ok``
reply each channel carries the frames of :mod:`xos_sshd.cr.pagestream`, and the client
copies them from one channel to the other.  The gateways' side, step by step:

source (:class:`Outbound`)                       target (:class:`Inbound`)
-----------------------------------------------  ------------------------------------------
``M hello`` (job, log directory, node, mode)
dump, job *frozen* (``--leave-stopped``):
  page-server: pages stream as ``P`` frames  -->  a page server as the user writes them
  lazy-pages: only the small images              (nothing yet)
seal: take the dump over, sign a manifest
``A``... ``a`` the signed archive            -->  verify it as an import (signature, owner,
                                                  hashes, credentials, quota); page-server:
                                                  take the page files over; restore
                                             <--  ``M restored`` (new job)
  lazy-pages: the source's CRIU serves      <-->  the target's lazy-pages daemon pulls the
  pages (``P``) until all are pulled              memory while the job runs
                                             <--  ``M complete``
end the frozen job (SIGKILL its namespace)
``M finished``                               -->  (done)

Any failure sends ``M failed {side, step, reason, error}``.  Everything the peer says is
hostile: its text reaches logs and the audit log only through :func:`service.one_line`
(no control characters, bounded) and a reason only as a code (:class:`MigrationFailed`).  Before ``complete`` the source
*thaws* the job (SIGCONT: it goes on where it was frozen) and says ``M aborted
{running: true}``; the target removes what it received and, in lazy mode, kills the copy it
restored (its memory would be incomplete) *before* the source thaws the original, so the job
is never lost and never runs twice for long.  ``dump-copy`` sends the whole image as the
archive, which the target imports into its image store and restarts (``restart``).
A stream with no frame for :data:`pagestream.IDLE_TIMEOUT` seconds is a failure: a frozen
job never waits on a dead relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

from . import criu, migimage
from .images import ImageError
from .jobs import JOBS_DIR, LAZY_PULL_DETAIL, Job, JobError
from .migcaps import MODES, job_memory
from .pagestream import (
    ArchiveFeed,
    ArchiveWriter,
    FrameStream,
    SocketPump,
    StreamError,
    cancel_quietly,
    decode_message,
)
from .service import JOB_ID, Caller, CRError, CRService, one_line

log = logging.getLogger(__name__)

STREAM_OPS = ('migrate-out', 'migrate-in')
#: The steps, as the user reads them ("migrate stopped at ...").
STEP_START = 'start the migration'
STEP_DUMP = 'dump at the source'
STEP_SEAL = 'seal the image at the source'
STEP_SEND = 'send the image to the target'
STEP_PAGES = 'receive the pages at the target'
STEP_VERIFY = 'verify the image at the target'
STEP_RESTART = 'restart at the target'
STEP_PULL = 'pull the memory to the target'
STEP_END = 'end the job at the source'
STEP_STREAM = 'relay between the gateways'
#: How long the lazy-pages daemon, a page server or a whole transfer may take.
TRANSFER_TIMEOUT = 3600.0
MAX_MESSAGES = 64
#: Live migration streams allowed per account and on the whole gateway: each holds a worker
#: thread while its archive moves, spool space, and a frozen or arriving job, so a user
#: opening many (and stalling them with keepalives) must not starve everyone else.  Counted
#: by each gateway's own ``CRService.migrations`` (migimage.MigrationLedger).
MAX_PER_ACCOUNT = 2
MAX_PER_GATEWAY = 8
#: A failure's reason is a stable code; a peer's that is not one is reported as ``peer-failed``.
REASON = re.compile(r'^[a-z0-9][a-z0-9-]{0,63}\Z')
SIDES = ('source', 'target')
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SOCKET_BUFFER = 4 << 20


class MigrationFailed(Exception):
    """A step failed here (``side`` = this gateway) or at the peer (``peer=True``).

    Every field is made safe for a log or audit line here, the one place a failure is made
    (a peer's ``failed`` message is hostile text): *step* and the message through
    :func:`one_line` (200 and 2000 characters), *reason* kept only if it is a code
    (:data:`REASON`, else ``peer-failed``), *side* only ``source`` or ``target``."""

    def __init__(self, step: str, reason: str, message: str, *, peer: bool = False,
                 side: str = '') -> None:
        super().__init__(one_line(message, 2000))
        self.step = one_line(step, 200)
        self.reason = reason if isinstance(reason, str) and REASON.match(reason) else 'peer-failed'
        self.peer = peer
        self.side = side if side in SIDES else ''


def _as_failure(step: str, exc: BaseException) -> MigrationFailed:
    if isinstance(exc, MigrationFailed):
        return exc
    reason = getattr(exc, 'reason', None)
    if isinstance(exc, criu.CriuError):
        reason = 'criu-failed'
    if not isinstance(reason, str):
        log.error('migration step %r failed', step, exc_info=exc)
        reason, text = 'internal-error', f'{type(exc).__name__} (see the gateway log)'
    else:
        text = str(exc)
    return MigrationFailed(step, reason, text)


class Session:
    """What both ends share: the frame router and the step bookkeeping."""

    side = ''
    action = ''

    def __init__(self, service: CRService, caller: Caller, mode: str) -> None:
        self.service = service
        self.caller = caller
        self.mode = mode
        self._step = STEP_START
        self.stream: FrameStream | None = None
        self.messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.seen: dict[str, dict[str, Any]] = {}
        self.pump: SocketPump | None = None
        self.pump_task: asyncio.Task[None] | None = None
        self.feed: ArchiveFeed | None = None
        self.router: asyncio.Task[None] | None = None
        self.keepalive: asyncio.Future[None] | None = None
        self.route_error: BaseException | None = None
        self.started = time.monotonic()
        self.token = 0  # in the service's MigrationLedger, while run() runs

    @property
    def account(self) -> Any:
        return self.caller.account

    @property
    def step(self) -> str:
        return self._step

    @step.setter
    def step(self, step: str) -> None:
        log.debug('migration (%s, %s) of %s: %s after %.3f s', self.side, self.mode,
                  self.caller.account.name, step, time.monotonic() - self.started)
        self._step = step

    # -- frames in ------------------------------------------------------------------------

    async def _route(self) -> None:
        assert self.stream is not None
        count = 0
        try:
            while True:
                frame = await self.stream.recv()
                if frame is None:
                    break
                kind, payload = frame
                if kind == b'P':
                    if self.pump is None:
                        raise StreamError('bad-stream', 'page bytes where none belong')
                    await self.pump.feed(payload)
                elif kind == b'p':
                    if self.pump is not None:
                        self.pump.feed_end()
                elif kind == b'A':
                    if self.feed is None:
                        raise StreamError('bad-stream', 'archive bytes where none belong')
                    await self.feed.put(payload)
                elif kind == b'a':
                    if self.feed is not None:
                        self.feed.end()
                elif kind == b'M':
                    count += 1
                    if count > MAX_MESSAGES:
                        raise StreamError('bad-stream', 'too many messages')
                    self.messages.put_nowait(decode_message(payload))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (kept: the waiting step reports it)
            self.route_error = exc
        finally:
            if self.feed is not None:
                self.feed.end(StreamError('bad-stream', 'the stream ended inside the archive'))
            if self.pump is not None:
                self.pump.close()  # the peer is gone: CRIU must not wait on it
            self.messages.put_nowait(None)

    async def expect(self, name: str, racing: asyncio.Future[Any] | None = None
                     ) -> dict[str, Any]:
        """The next message *name* from the peer.  A ``failed`` message, the end of the
        stream, or *racing* failing first raises MigrationFailed."""
        if name in self.seen:
            return self.seen.pop(name)
        while True:
            getter = asyncio.ensure_future(self.messages.get())
            waits: set[asyncio.Future[Any]] = {getter}
            if racing is not None and not racing.done():
                waits.add(racing)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                assert racing is not None
                exc = racing.exception()
                if exc is not None:
                    raise _as_failure(self.step, exc)
                racing = None
                continue
            msg = getter.result()
            if msg is None:
                self.messages.put_nowait(None)  # for the next waiter
                raise self._stream_over()
            if msg['msg'] == 'failed':
                raise self._peer_failed(msg)
            if msg['msg'] == name:
                return msg
            self.seen[msg['msg']] = msg

    def failure_of(self, exc: BaseException) -> MigrationFailed:
        """The failure to report for *exc*: the peer's, when it said it failed (what happens
        here then is a consequence), else this side's."""
        if isinstance(exc, asyncio.CancelledError):
            return MigrationFailed(self.step, 'cancelled', 'the gateway is stopping')
        failure = _as_failure(self.step, exc)
        return failure if failure.peer else (self.peer_failure() or failure)

    def _stream_over(self) -> MigrationFailed:
        exc = self.route_error
        if isinstance(exc, (ImageError, StreamError)):
            return MigrationFailed(self.step, exc.reason, str(exc))
        if exc is not None:
            return _as_failure(self.step, exc)
        return MigrationFailed(self.step, 'peer-gone', 'the other gateway (or the xos-cr '
                               'relaying between them) went away')

    def peer_failure(self) -> MigrationFailed | None:
        """A ``failed`` message already received, if any (without waiting)."""
        while not self.messages.empty():
            msg = self.messages.get_nowait()
            if msg is None:
                self.messages.put_nowait(None)
                break
            if msg['msg'] == 'failed':
                return self._peer_failed(msg)
            self.seen[msg['msg']] = msg
        return None

    def _peer_failed(self, msg: Mapping[str, Any]) -> MigrationFailed:
        """The peer's ``failed`` message (its fields are the peer's word: MigrationFailed
        makes them safe)."""
        return MigrationFailed(str(msg.get('step') or self.step), str(msg.get('reason')),
                               str(msg.get('error') or ''), peer=True,
                               side=str(msg.get('side') or ''))

    async def _why(self, step: str, exc: BaseException) -> MigrationFailed:
        """What made CRIU fail: the peer's failure, a refusal of what the stream carried
        (quota), the stream's end, or CRIU itself.  When the peer's CRIU closed the page
        stream first, its ``failed`` message is on the way: wait a little for it."""
        deadline = time.monotonic() + 5
        while True:
            peer = self.peer_failure()
            if peer is not None:
                return peer
            if self.pump is None or not self.pump.peer_ended or self.router is None \
                    or self.router.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if self.route_error is not None:
            return self._stream_over()
        return _as_failure(step, exc)

    # -- the run --------------------------------------------------------------------------

    async def run(self, stream: FrameStream) -> int:
        """Migrate over *stream*: 0 when done, 1 when it failed (undone as far as it can be;
        ``_abort`` says how).  Cancelled (the gateway stopping): undone, then re-raised.
        The whole run is bounded by :data:`TRANSFER_TIMEOUT`, whatever keepalives say.
        The stream counts in the service's ledger (concurrency, staged bytes) until what it
        made is removed; the source has its job (``CRService.job_op``) until it is over."""
        self.stream = stream
        ledger = self.service.migrations
        self.token = ledger.enter(self.account.uid)
        claim = contextlib.ExitStack()
        try:
            check_concurrency(self.service, self.account.uid, live_included=True)
            claim.enter_context(self._claim())
            await self._setup()
            self.router = asyncio.ensure_future(self._route())
            self.keepalive = asyncio.ensure_future(stream.keepalive())
            async with asyncio.timeout(TRANSFER_TIMEOUT):
                await self._migrate()
            return 0
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 (every failure is undone)
            await self._abort(self.failure_of(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return 1
        finally:
            try:
                await self._cleanup()
            finally:
                claim.close()
                ledger.leave(self.token)
                await self.shutdown()

    def _claim(self) -> contextlib.AbstractContextManager[Any]:
        """What this side has for the whole run (the source: its job)."""
        return contextlib.nullcontext()

    async def _setup(self) -> None:
        """What must exist before the first frame is read."""

    async def _migrate(self) -> None:
        raise NotImplementedError

    async def _abort(self, failure: MigrationFailed) -> None:
        raise NotImplementedError

    async def _cleanup(self) -> None:
        """Remove what this side made (always, after success or failure)."""

    # -- helpers --------------------------------------------------------------------------

    def start_pump(self, charge: Any = None) -> int:
        """A socketpair for CRIU's ``--ps-socket``: returns CRIU's end (a raw fd, closed by
        whoever passes it on); the gateway's end is bridged to ``P`` frames.  *charge*: see
        :class:`SocketPump` (page bytes a page server writes to disk)."""
        assert self.stream is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ours, theirs):  # room for whole frames both ways (root may force it)
            for opt in (SO_SNDBUFFORCE, SO_RCVBUFFORCE):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
        self.pump = SocketPump(ours, self.stream, charge)
        self.pump_task = asyncio.ensure_future(self.pump.run())
        return theirs.detach()

    async def tell_failed(self, exc: MigrationFailed, **extra: Any) -> None:
        if exc.peer or self.stream is None:
            return
        try:
            await asyncio.wait_for(self.stream.send_message(
                'failed', side=self.side, step=exc.step, reason=exc.reason, error=str(exc),
                **extra), 10)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 (the peer may be gone)
            pass

    def audit(self, outcome: str, **fields: Any) -> None:
        fields = {k: v for k, v in fields.items() if v is not None}
        self.service._audit(self.caller, self.action, outcome, mode=self.mode,
                            seconds=round(time.monotonic() - self.started, 3), **fields)

    async def shutdown(self) -> None:
        if self.pump is not None:
            self.pump.close()
        await cancel_quietly(self.pump_task, self.keepalive)
        if self.stream is not None:
            self.stream.close()
        if self.router is not None and not self.router.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.router), 10)
            except (TimeoutError, asyncio.CancelledError):
                pass
            await cancel_quietly(self.router)


# ---------------------------------------------------------------------------- source


class Outbound(Session):
    """``migrate-out``: dump the job frozen, send it, end it once it runs at the target."""

    side = 'source'
    action = 'migrate-out'

    def __init__(self, service: CRService, caller: Caller, mode: str, job: Job) -> None:
        super().__init__(service, caller, mode)
        self.job = job
        self.dump_task: asyncio.Task[Any] | None = None
        self.spool: str | None = None
        self.work_dir: str | None = None
        self.sealed: migimage.Sealed | None = None
        self.frozen_at = 0.0
        self.restored: dict[str, Any] | None = None

    def _claim(self) -> contextlib.AbstractContextManager[Any]:
        return self.service.job_op(self.job.id, 'migration')

    async def _cleanup(self) -> None:
        if self.sealed is not None:
            self.sealed.close()
        for path in (self.spool, self.work_dir):
            await asyncio.to_thread(migimage.discard, path)

    async def _migrate(self) -> None:
        assert self.stream is not None
        jobs, job = self.service.jobs, self.job
        log_job = os.path.basename(job.log_dir.rstrip('/')) if job.log_dir else job.id
        await self.stream.send_message('hello', job=job.id, node=jobs.node, mode=self.mode,
                                       log_job=log_job if JOB_ID.match(log_job) else job.id)
        self.step = STEP_DUMP
        options: dict[str, Any] = {'keep_stopped': True}
        extra: list[str] = []
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.mode != 'dump-copy':
            fd = self.start_pump()
            options['pass_fds'] = [fd]
            extra = ['--page-server' if self.mode == 'page-server' else '--lazy-pages',
                     '--ps-socket', str(fd)]
            if self.mode == 'lazy-pages':
                # CRIU writes its stats at the very end, after the images are taken over.
                self.work_dir = jobs._make_image_dir(self.account, 'w' + secrets.token_hex(8))
                extra += ['--work-dir', self.work_dir]
                options['images_ready'] = lambda d: ready.done() or ready.set_result(d)
        self.frozen_at = time.monotonic()
        self.dump_task = asyncio.ensure_future(jobs.checkpoint(
            job.id, self.account, stop=False, extra_args=extra, dump_options=options))
        if self.mode == 'lazy-pages':
            await asyncio.wait({ready, self.dump_task}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                await self._dump_result()
                raise MigrationFailed(STEP_DUMP, 'criu-failed', 'the lazy dump ended without '
                                      'serving the pages')
            self.spool = ready.result()
        else:
            self.spool = (await self._dump_result()).images_dir
        self.step = STEP_SEAL
        self.sealed = await asyncio.to_thread(
            migimage.seal, self.service.images, self.spool, self.account, self.caller.owner,
            job.id, job.command, self.service.criu_version)
        self.step = STEP_SEND
        writer = ArchiveWriter(self.stream, asyncio.get_running_loop())
        await asyncio.to_thread(migimage.send_sealed, self.sealed, writer)
        await self.stream.send(b'a')
        self.step = STEP_RESTART
        lazy = self.dump_task if self.mode == 'lazy-pages' else None
        self.restored = await self.expect('restored', racing=lazy)
        frozen = time.monotonic() - self.frozen_at
        if self.mode == 'lazy-pages':
            self.step = STEP_PULL
        await self.expect('complete', racing=lazy)
        if self.mode == 'lazy-pages':  # CRIU ends once the daemon said it has everything
            await asyncio.wait_for(self._dump_result(), 60)
        self.step = STEP_END
        new_job = one_line(self.restored.get('job') or '', 64)  # the peer's word
        target = one_line(self.restored.get('node') or '', 200)
        criu.kill_namespace(job.namespace, job.uid)
        await jobs.table.update(job.id, expect_state='running', state='killed',
                                ended=time.time(), detail=f'migrated to {target} as {new_job} '
                                f'({self.mode})')
        self.audit('ok', job=job.id, new_job=new_job, target_node=target,
                   frozen_seconds=round(frozen, 3))
        log.info('job %s of %s migrated to %s as %s (%s, frozen %.3f s)', job.id,
                 self.account.name, target, new_job, self.mode, frozen)
        await self.stream.send_message('finished', job=job.id, new_job=new_job,
                                       frozen_seconds=round(frozen, 3))

    async def _dump_result(self) -> Any:
        """The dump's Checkpoint; a failure that the peer caused is reported as the peer's."""
        assert self.dump_task is not None
        try:
            return await self.dump_task
        except (JobError, criu.CriuError) as exc:
            raise await self._why(STEP_DUMP, exc) from None

    async def _abort(self, failure: MigrationFailed) -> None:
        """Undo: stop CRIU, let the job go on where it was frozen, tell the peer and user."""
        await self.tell_failed(failure)
        if self.pump is not None:
            self.pump.close()  # a dump or page server still running fails at once
        if self.dump_task is not None and not self.dump_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.dump_task), 30)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                await cancel_quietly(self.dump_task)
        if self.restored is not None and self.router is not None:
            # The target restored a copy (lazy pages): it kills that copy before it answers;
            # wait for it (or for the stream's end) before the original runs again.
            try:
                await asyncio.wait_for(asyncio.shield(self.router), 15)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                pass
        # Only what this migration froze is thawed: before its dump the job was not touched
        # (it may be another operation's, when the job was busy).
        thawed = (criu.thaw_namespace(self.job.namespace, self.job.uid)
                  if self.dump_task is not None else 0)
        running = bool(criu.namespace_members(self.job.namespace, self.job.uid))
        log.warning('migration of job %s stopped at %r (%s): %s; thawed %d processes',
                    self.job.id, failure.step, failure.reason, failure, thawed)
        self.audit('refused', job=self.job.id, step=failure.step, reason=failure.reason,
                   message=one_line(failure), failed_at='target' if failure.peer else 'source',
                   running=running)
        if self.stream is not None:
            try:
                await asyncio.wait_for(self.stream.send_message(
                    'aborted', job=self.job.id, running=running), 10)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------- target


class Inbound(Session):
    """``migrate-in``: receive, verify, restore; in lazy mode, pull the memory."""

    side = 'target'
    action = 'migrate-in'

    def __init__(self, service: CRService, caller: Caller, mode: str, used: int) -> None:
        super().__init__(service, caller, mode)
        self.budget = service.images.quota_bytes - used
        self.daemon: criu.CriuDaemon | None = None
        self.dirs: list[str] = []
        self.staged: migimage.Staged | None = None
        self.restore_dir: str | None = None
        self.job: Job | None = None
        self.complete = False
        self.image_id: str | None = None
        self.tasks: list[asyncio.Future[Any]] = []
        self.criu_fd = -1  # CRIU's end of the page socket until a CRIU takes it
        self.recv_dir = ''

    async def _setup(self) -> None:
        # Everything the frames may go to exists before the first frame is read.
        self.feed = ArchiveFeed()
        if self.mode != 'dump-copy':  # a page server writes the page bytes to disk
            self.criu_fd = self.start_pump(self._charge if self.mode == 'page-server' else None)
        if self.mode == 'page-server':
            self.step = STEP_PAGES
            self.recv_dir = self._user_dir('r')
            fd, self.criu_fd = self.criu_fd, -1
            self.daemon = await criu.start_page_server(
                self.recv_dir, self.account, fd, criu_path=self.service.jobs.criu_path)

    async def _cleanup(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        if self.criu_fd >= 0:
            os.close(self.criu_fd)
        await cancel_quietly(*self.tasks)
        if self.restore_dir is not None:
            try:
                await self.service.images.release_restore_dir(self.restore_dir)
            except (OSError, ValueError):
                pass
        for path in [*self.dirs, self.staged.path if self.staged else None]:
            await asyncio.to_thread(migimage.discard, path)

    def _charge(self, nbytes: int) -> None:
        """*nbytes* more staged on disk by this stream: charged to the account across all its
        streams, ImageError ``quota-exceeded`` past its image quota (MigrationLedger)."""
        self.service.migrations.charge(self.token, nbytes, self.service.images)

    def _user_dir(self, prefix: str) -> str:
        path = self.service.jobs._make_image_dir(self.account, prefix + secrets.token_hex(8))
        self.dirs.append(path)
        return path

    async def _receive_signed(self) -> migimage.Staged:
        task = asyncio.ensure_future(asyncio.to_thread(
            migimage.receive_signed, self.service.images, self.account, self.caller.owner,
            self.feed, self.budget, self._charge))
        self.tasks.append(task)
        self.staged = await task
        return self.staged

    async def _migrate(self) -> None:
        assert self.stream is not None
        hello = await self.expect('hello')
        if hello.get('mode') != self.mode:
            raise MigrationFailed(STEP_START, 'bad-stream', f'the source sends '
                                  f'{one_line(hello.get("mode"), 32)!r}, not {self.mode}')
        jobs = self.service.jobs
        if self.mode == 'dump-copy':
            await self._dump_copy(hello)
        elif self.mode == 'page-server':
            self.step = STEP_PAGES
            assert self.daemon is not None
            recv_dir = self.recv_dir
            signed = asyncio.ensure_future(self._receive_signed())
            self.tasks.append(signed)
            finish = asyncio.ensure_future(self.daemon.finish(TRANSFER_TIMEOUT))
            self.tasks.append(finish)
            # The signed part may be refused (quota...) before the pages are all in; a
            # stream that broke ends both, and _why below says why.
            await asyncio.wait({finish, signed}, return_when=asyncio.FIRST_COMPLETED)
            refused = (signed.exception() if signed.done() and not signed.cancelled()
                       else None)
            if isinstance(refused, ImageError) and not finish.done():
                self.step = STEP_VERIFY
                raise refused
            try:
                await finish
            except criu.CriuError as exc:
                raise await self._why(STEP_PAGES, exc) from None
            self.step = STEP_VERIFY
            staged = await signed
            pages = await asyncio.to_thread(migimage.take_pages, recv_dir, self.account)
            # What is on disk now (the account may have written to the page server's
            # directory besides it) replaces what the stream was charged for on the way.
            self.service.migrations.settle(
                self.token, staged.manifest.size_bytes + sum(p.size for p in pages.values()),
                self.service.images)
            self.restore_dir = await asyncio.to_thread(
                migimage.assemble, self.service.images, self.account, staged, recv_dir, pages)
            self.step = STEP_RESTART
            await self._restore(staged, hello)
            await self.stream.send_message('complete')
        else:
            self.step = STEP_VERIFY
            staged = await self._receive_signed()
            self.restore_dir = await asyncio.to_thread(
                migimage.assemble, self.service.images, self.account, staged)
            work_dir = self._user_dir('w')
            fd, self.criu_fd = self.criu_fd, -1
            self.step = STEP_RESTART
            self.daemon = await criu.start_lazy_pages(self.restore_dir, work_dir, self.account,
                                                      fd, criu_path=jobs.criu_path)
            await self._restore(staged, hello, ['--lazy-pages', '--work-dir', work_dir])
            assert self.job is not None
            self.step = STEP_PULL
            finish = asyncio.ensure_future(self.daemon.finish(TRANSFER_TIMEOUT))
            self.tasks.append(finish)
            try:
                await finish
            except criu.CriuError as exc:
                raise await self._why(STEP_PULL, exc) from None
            await jobs.table.update(self.job.id, detail=self._restored_detail(staged))
            await self.stream.send_message('complete')
        self.complete = True
        assert self.job is not None
        self.audit('ok', job=self.job.id, source_node=self.source_node,
                   source_job=one_line(hello.get('job'), 64), image=self.image_id)
        self.step = STEP_END
        try:
            await self.expect('finished')
        except MigrationFailed as exc:  # the job runs here; the source says what it did
            log.warning('migrated job %s: the source did not confirm the end of the '
                        'original: %s', self.job.id, exc)

    @property
    def source_node(self) -> str | None:
        return one_line(self.staged.manifest.node, 200) if self.staged else None

    def _restored_detail(self, staged: migimage.Staged) -> str:
        return f'migrated from {one_line(staged.manifest.node, 200)} ({self.mode})'

    async def _restore(self, staged: migimage.Staged, hello: Mapping[str, Any],
                       extra: list[str] | None = None) -> None:
        assert self.stream is not None and self.restore_dir is not None
        jobs = self.service.jobs
        started = time.monotonic()
        # A restore starts a job: the same lock and limit as run and restart.
        async with self.service.starting_job(self.caller):
            job = await jobs.restore(self.restore_dir, self.account,
                                     image_id=staged.manifest.id, extra_args=extra or ())
            self.job = job
            log_job = hello.get('log_job')
            if not isinstance(log_job, str) or not JOB_ID.match(log_job):
                log_job = staged.manifest.job_id or job.id
            await jobs.table.update(
                job.id, command=json.dumps(list(staged.manifest.command)),
                log_dir=os.path.join(self.account.home, JOBS_DIR, log_job),
                # Until its memory has arrived a lazily restored job is marked, before
                # anything else can happen (jobs.reconcile kills it if the gateway stops).
                detail=(LAZY_PULL_DETAIL if self.mode == 'lazy-pages'
                        else self._restored_detail(staged)))
        await self.stream.send_message('restored', job=job.id, node=jobs.node,
                                       seconds=round(time.monotonic() - started, 3))

    async def _dump_copy(self, hello: Mapping[str, Any]) -> None:
        assert self.stream is not None and self.feed is not None
        self.step = STEP_VERIFY
        info = await self.service.import_archive(self.caller, self.feed, charge=self._charge)
        self.image_id = info.id
        # Its bytes are the account's stored image now (still charged to this stream until
        # it ends: counted twice for a while, never not at all).
        self.service.migrations.note_stored(
            self.account.uid, (await self.service.images.usage(self.account.uid))[0])
        self.step = STEP_RESTART
        log_job = hello.get('log_job')
        reply = await self.service.handle(self.caller, {
            'op': 'restart', 'image': info.id,
            **({'logs_of': log_job} if isinstance(log_job, str) and JOB_ID.match(log_job) else {})})
        if not reply.get('ok'):
            raise MigrationFailed(STEP_RESTART, str(reply.get('reason')), str(reply.get('error')))
        self.job = await self.service.jobs.table.get(reply['job']['id'])
        await self.stream.send_message('restored', job=reply['job']['id'],
                                       node=self.service.jobs.node)
        self.staged = None
        await self.stream.send_message('complete')

    async def _abort(self, failure: MigrationFailed) -> None:
        killed = False
        if self.job is not None and not self.complete:
            # Restored, but its memory did not all arrive (or the source failed after):
            # this copy must not run on with holes in its memory.
            killed = criu.kill_namespace(self.job.namespace, self.job.uid)
            await self.service.jobs.table.update(
                self.job.id, state='failed', ended=time.time(),
                detail=f'migration stopped at {failure.step}: copy killed')
        if self.daemon is not None:
            self.daemon.kill()
        await self.tell_failed(failure, target_job_killed=killed)
        if self.image_id is not None and not self.complete:
            try:
                await self.service.images.remove(self.account.uid, self.image_id)
            except (ImageError, OSError):
                pass
        log.warning('incoming migration for %s stopped at %r (%s): %s', self.account.name,
                    failure.step, failure.reason, failure)
        self.audit('refused', job=self.job.id if self.job else None, step=failure.step,
                   reason=failure.reason, message=one_line(failure),
                   failed_at='source' if failure.peer else 'target',
                   source_node=self.source_node)


# ---------------------------------------------------------------------------- entry


async def prepare(service: CRService, caller: Caller, request: Mapping[str, Any]) -> Session:
    """Check a ``migrate-out``/``migrate-in`` request before its ``ok`` reply; raises the
    cr errors (CRError, JobError, ImageError) for a refusal."""
    op = str(request.get('op', '')).removeprefix('cr.')
    mode = request.get('mode')
    if mode not in MODES:
        raise CRError('bad-request', f'field "mode" must be one of {", ".join(MODES)}')
    check_concurrency(service, caller.account.uid, live_included=False)
    if service.unavailable:
        raise CRError('criu-unavailable', f'checkpoint/restart is not available on this '
                      f'node: {service.unavailable}')
    probe = getattr(service, 'migration', None)
    if op == 'migrate-out':
        job_id = request.get('job')
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise CRError('no-such-job', f'no job {str(job_id)[:80]!r}')
        job = await service.job_of(caller, job_id)
        service.check_job_free(job.id)  # and again when the stream starts (Outbound._claim)
        job = await service.jobs.running(job.id, caller.account)
        if probe is not None and mode == 'lazy-pages':
            caps = await probe.caps(await asyncio.to_thread(job_memory, job.namespace, job.uid))
            if mode not in caps.send:
                raise CRError('mode-unavailable', f'this node cannot send lazy-pages: '
                              f'{caps.why.get(mode, "")}')
        return Outbound(service, caller, mode, job)
    if probe is not None and mode == 'lazy-pages':
        caps = await probe.caps()
        if mode not in caps.receive:
            raise CRError('mode-unavailable', f'this node cannot receive lazy-pages: '
                          f'{caps.why.get(mode, "")}')
    if service.max_jobs:
        await service._check_job_limit(caller)  # early; the restore itself takes the lock
    uid = caller.account.uid
    used, count = await service.images.usage(uid)
    service.migrations.note_stored(uid, used)
    staged = service.migrations.staged(uid)
    if used + staged >= service.images.quota_bytes or (
            mode == 'dump-copy' and count + 1 > service.images.quota_count):
        raise ImageError('quota-exceeded', f'image quota exceeded for uid {uid}: {count} '
                         f'images, {used} bytes and {staged} staged by incoming migrations '
                         f'of {service.images.quota_bytes} allowed '
                         f'({service.images.quota_count} images)')
    return Inbound(service, caller, mode, used)


def check_concurrency(service: CRService, uid: int, live_included: bool) -> None:
    """Refuse a migration stream beyond :data:`MAX_PER_ACCOUNT` / :data:`MAX_PER_GATEWAY` on
    *service*'s gateway (checked before the ``ok`` reply, and again when the stream runs:
    *live_included* says the caller is already counted)."""
    extra = 0 if live_included else 1
    if service.migrations.live(uid) + extra > MAX_PER_ACCOUNT:
        raise CRError('too-many-migrations', f'this account already has {MAX_PER_ACCOUNT} '
                      f'migrations in progress on this node: wait for one to end')
    if service.migrations.live() + extra > MAX_PER_GATEWAY:
        raise CRError('too-many-migrations', f'this node already runs {MAX_PER_GATEWAY} '
                      f'migrations: try again later')


def refusal(service: CRService, caller: Caller, request: Mapping[str, Any],
            exc: BaseException) -> dict[str, Any]:
    """The audited refusal reply of a stream op that did not start."""
    op = str(request.get('op', '')).removeprefix('cr.')
    if isinstance(exc, (CRError, JobError, ImageError)):
        return service._refused(caller, op, request, exc.reason, str(exc))
    if isinstance(exc, criu.CriuError):
        return service._refused(caller, op, request, 'criu-failed', str(exc))
    log.exception('%s for %s failed', op, caller.account.name, exc_info=exc)
    return {'ok': False, 'reason': 'internal-error', 'error': f'{op} failed inside xos-sshd'}
