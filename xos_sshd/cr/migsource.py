"""Migration, the source's side (``migrate-out``): dump, seal, send; thaw on any failure
before the target has the job.  Protocol: :mod:`xos_sshd.cr.migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import Any

from . import criu, migimage
from .jobs import Job, JobError
from .migsession import (
    STEP_DUMP,
    STEP_END,
    STEP_PULL,
    STEP_RESTART,
    STEP_SEAL,
    STEP_SEND,
    MigrationFailed,
    Session,
)
from .pagestream import (
    ArchiveWriter,
    cancel_quietly,
)
from .service import JOB_ID, Caller, CRService, one_line

log = logging.getLogger(__name__)


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
