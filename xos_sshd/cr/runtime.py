"""Checkpoint/restart inside a running gateway: open, reconcile, poll, reap, close.

:meth:`CRRuntime.open` (from :meth:`Gateway.open`) builds the :class:`JobManager` (job table
in the AMS store, dumps spooled in ``STATE/cr-spool``), the :class:`ImageStore` (``STATE``,
config ``[images]``) and the one :class:`CRService`; it reconciles the job table with the
processes of this node (jobs that ended while no gateway watched become ``lost``) and makes
the gateway a child subreaper so that job inits are re-parented to it.  :meth:`start` runs
the poll loop: every :data:`POLL_INTERVAL` seconds adopted zombies are reaped
(:mod:`xos_sshd.cr.reaper`; never a session's or a subprocess's child) and ended jobs marked
with their exit code.

No usable CRIU (none found, too old, ``criu_path`` wrong) does not stop the gateway: the ops
that need CRIU answer ``criu-unavailable`` with the reason, the others work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..ams import AMS
from ..ams.store import OutageLog, StoreUnavailable
from ..session import libc
from ..tasks import cancel_and_wait
from . import criu
from .images import DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_COUNT, ImageStore, Owner
from .jobs import JobManager, JobTable, reconcile
from .migcaps import MigrationProbe
from .migimage import prune_at_start
from .reaper import Reaper
from .service import Caller, CRService
from .subsystem import subsystems

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
#: A job whose own checkpoint request failed is not served again before this many seconds.
REQUEST_RETRY = 30.0


def _images_setting(config: Any, key: str, default: Any) -> Any:
    """``config.images.KEY`` (the ``[images]`` table) when the config has it."""
    table = getattr(config, 'images', None)
    if table is None:
        return default
    value = table.get(key, default) if isinstance(table, dict) else getattr(table, key, default)
    return default if value is None else value


class CRRuntime:
    """The gateway's checkpoint/restart part."""

    def __init__(self, service: CRService, upload_dir: Path, ams: AMS | None = None) -> None:
        self.service = service
        self.upload_dir = upload_dir
        self.ams = ams
        self.reaper = Reaper()
        self._task: asyncio.Task[None] | None = None
        #: Checkpoints a job asked for itself (xos_sshd.cr.api), running in the background.
        self._requested: dict[str, asyncio.Task[None]] = {}
        self._retry_after: dict[str, float] = {}  # job id -> monotonic time (after a failure)
        #: Exit codes of reaped job inits not yet recorded (the store was unavailable).
        self._reaped: dict[int, int] = {}
        #: A store outage is said once when the poll starts failing and once when it works.
        self._outage = OutageLog(log, 'cr poll (ended jobs, checkpoint requests)')

    @classmethod
    async def open(cls, config: Any, ams: AMS, audit: Any, *, cr_socket: str = '') -> 'CRRuntime':
        state = Path(config.state_dir)
        node = str(_images_setting(config, 'node_name', '') or socket.gethostname())
        configured = _images_setting(config, 'criu_path', None) or getattr(config, 'criu_path', None)
        unavailable, criu_path, version = '', None, ''
        try:
            criu_path = await asyncio.to_thread(criu.find_criu, str(configured) if configured else None)
            version = (await asyncio.to_thread(criu.criu_version, criu_path))[1]
        except criu.CriuError as exc:
            unavailable = exc.reason
            log.warning('checkpoint/restart unavailable: %s', exc.reason)
        images = await ImageStore.open(
            state, node_name=node,
            trusted_keys=[str(k) for k in _images_setting(config, 'trusted_node_keys', ())],
            quota_bytes=int(_images_setting(config, 'quota_bytes', DEFAULT_QUOTA_BYTES)),
            quota_count=int(_images_setting(config, 'quota_count', DEFAULT_QUOTA_COUNT)))
        jobs = JobManager(JobTable(ams.store), spool_dir=str(state / 'cr-spool'), node=node,
                          criu_path=criu_path)
        jobs.rlimits = getattr(getattr(config, 'session', None), 'rlimits', ())
        changed = await reconcile(jobs.table, node)
        for job_id, new_state in changed.items():
            audit.write('cr', action='reconcile', outcome='ok', route='node', job=job_id,
                        state=new_state)
        if changed:
            log.info('job table reconciled: %s', ', '.join(f'{j} {s}' for j, s in changed.items()))
        # Dumps and migrations cut off by the stop of the previous run: nothing uses them now.
        pruned = await asyncio.to_thread(prune_at_start, state, jobs.spool_dir)
        if pruned:
            log.info('pruned %d stale spool entries left by the previous run: %s', len(pruned),
                     ', '.join(pruned[:100]) + (' ...' if len(pruned) > 100 else ''))
        service = CRService(jobs, images, audit, criu_version=version, unavailable=unavailable,
                            job_env={'XOS_CR_SOCKET': cr_socket} if cr_socket else None)
        # Migration modes: CRIU's kernel features probed in the background (cr/migcaps.py).
        service.migration = MigrationProbe(node, criu_path, version, unavailable)
        service.migration.start()
        try:
            libc.set_child_subreaper(True)
        except OSError as exc:  # job inits then go to pid 1, which must reap them
            log.warning('cannot become a child subreaper: %s', exc)
        upload_dir = state / 'cr-uploads'
        upload_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(upload_dir, 0o700)
        for leftover in upload_dir.glob('*/*.part'):  # uploads cut off by a stop
            leftover.unlink(missing_ok=True)
        log.info('checkpoint/restart: node %s, CRIU %s, image key %s', node,
                 f'{version} ({criu_path})' if criu_path else 'unavailable', images.fingerprint)
        return cls(service, upload_dir, ams)

    def start(self) -> None:
        """Start the poll loop (ended jobs, adopted zombies)."""
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.poll_once()
            except StoreUnavailable as exc:  # a shared store's outage: said once, not per pass
                self._outage.failed(exc)
            except Exception:
                log.exception('cr poll failed; will retry')
            else:
                self._outage.ok()

    async def poll_once(self) -> None:
        # Reaped exit codes are kept until a refresh recorded them (a pass may fail midway).
        self._reaped.update(self.reaper.reap())
        await self.service.refresh(self._reaped)
        self._reaped.clear()
        if not self.service.unavailable:
            await self._serve_checkpoint_requests()

    async def _serve_checkpoint_requests(self) -> None:
        """Checkpoint the jobs that asked for it (``api.request_checkpoint``) for their owner,
        as ``xos-cr checkpoint JOB [--stop]`` would: same op, same image store, same audit."""
        for request in await self.service.jobs.checkpoint_requests():
            job = request.job
            if job.id in self._requested or self.ams is None \
                    or self._retry_after.get(job.id, 0) > time.monotonic():
                continue
            record = await self.ams.mapping_for_uid(job.uid)
            if record is None or record.account.vo != job.vo \
                    or record.account.vo_user != job.vo_user:
                log.warning('job %s asked for a checkpoint but uid %d no longer maps to its '
                            'owner: ignored', job.id, job.uid)
                continue
            caller = Caller(Owner(job.vo, job.vo_user), record.account, 'api', f'job {job.id}')
            task = asyncio.create_task(self._requested_checkpoint(caller, job.id, request.stop))
            self._requested[job.id] = task

    async def _requested_checkpoint(self, caller: Caller, job_id: str, stop: bool) -> None:
        try:
            reply = await self.service.handle(caller, {'op': 'checkpoint', 'job': job_id,
                                                       'stop': stop})
            if reply.get('ok'):
                log.info('job %s checkpointed itself: image %s', job_id, reply['image']['id'])
                self._retry_after.pop(job_id, None)
            else:
                log.warning('checkpoint job %s asked for failed: %s', job_id, reply.get('error'))
                self._retry_after[job_id] = time.monotonic() + REQUEST_RETRY
        finally:
            self._requested.pop(job_id, None)

    def caller(self, identity: Any, account: Any, source: str) -> Caller:
        return Caller(Owner(identity.vo, identity.user), account, 'ssh', source)

    def subsystems(self, source: str) -> dict[str, Callable[[Any], Any]]:
        """The in-gateway subsystems for a session from *source* (``host:port``)."""
        return subsystems(self.service, lambda ctx: self.caller(ctx.identity, ctx.account, source),
                          self.upload_dir)

    async def close(self) -> None:
        if self.service.migration is not None:
            await self.service.migration.close()
        for task in list(self._requested.values()):
            task.cancel()
        await cancel_and_wait(self._task)
        self._task = None
        try:
            self.reaper.reap()
        except OSError:
            pass
