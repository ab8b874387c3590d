"""Migration, the target's side (``migrate-in``): verify as an import, restore, pull the
memory in lazy mode; remove everything on any failure.  Protocol: :mod:`xos_sshd.cr.migrate`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

from . import criu, migimage
from .images import ImageError
from .jobs import JOBS_DIR, LAZY_PULL_DETAIL, Job
from .migsession import (
    STEP_END,
    STEP_PAGES,
    STEP_PULL,
    STEP_RESTART,
    STEP_START,
    STEP_VERIFY,
    TRANSFER_TIMEOUT,
    MigrationFailed,
    Session,
)
from .pagestream import (
    ArchiveFeed,
    cancel_quietly,
)
from .service import JOB_ID, Caller, CRService, one_line

log = logging.getLogger(__name__)


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
