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
import logging
from collections.abc import Mapping
from typing import Any

from . import criu
from .images import ImageError
from .jobs import JobError
from .migcaps import MODES, job_memory
from .migsession import (  # noqa: F401 (the limits, re-exported: part of this module's face)
    MAX_PER_ACCOUNT,
    MAX_PER_GATEWAY,
    Session,
    check_concurrency,
)
from .migsource import Outbound
from .migtarget import Inbound
from .service import JOB_ID, Caller, CRError, CRService

log = logging.getLogger(__name__)

STREAM_OPS = ('migrate-out', 'migrate-in')


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
