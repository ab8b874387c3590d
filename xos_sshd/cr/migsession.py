"""Migration streams: what the source's and the target's side share (:class:`Session`, the
steps, the limits, :class:`MigrationFailed`).  The protocol is described in
:mod:`xos_sshd.cr.migrate`; :mod:`.migsource` and :mod:`.migtarget` hold the two sides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

from . import criu
from .images import ImageError
from .pagestream import (
    ArchiveFeed,
    FrameStream,
    SocketPump,
    StreamError,
    cancel_quietly,
    decode_message,
)
from .service import Caller, CRError, CRService, one_line

log = logging.getLogger(__name__)

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
