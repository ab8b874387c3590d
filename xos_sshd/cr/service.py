"""The checkpoint/restart operations, once, for every transport.

:class:`CRService` is what ``xos-cr`` talks to, whichever way it comes in: the SSH subsystem
``xos-cr`` (:mod:`xos_sshd.cr.subsystem`, the caller being the SSH-authenticated identity and
its account), the users' local socket (:mod:`xos_sshd.cr.localops`, the caller being the
peer's uid mapped back to its identity), and the ``xos-images`` SFTP subsystem
(:mod:`xos_sshd.cr.sftp`, for archive download and upload).  One request is one JSON object
``{"op": NAME, ...fields}``; the reply is ``{"ok": true, ...}`` or ``{"ok": false, "reason":
CODE, "error": ONE LINE}`` (the control socket's shape).

Ops and fields (``docs/internals.md``, section "cr"):

``run {argv: [str], env?: {str: str}}`` -> ``{job}``; ``list {}`` -> ``{jobs: [job]}``;
``logs {job, max_bytes?}`` -> ``{job, stdout, stderr, stdout_size, stderr_size, truncated}``;
``kill {job, signal?}`` -> ``{job, ended}``; ``checkpoint {job, stop?}`` -> ``{image, job,
seconds}``; ``restart {image, logs_of?}`` -> ``{job}``; ``images {}`` -> ``{images:
[image]}``; ``image {image}`` -> ``{image}``; ``rm {image}`` -> ``{image: id}``;
``imported {upload}`` -> ``{image}`` (the result of an ``xos-images`` upload).  A *job* is
:meth:`Job.as_dict`, an *image* :meth:`ImageInfo.as_dict`.

Isolation: a job or image is the caller's only if both its uid is the caller's account's and
its owner identity (VO, VO user) is the caller's; anything else answers ``no-such-job`` /
``no-such-image``, exactly as for an id that never existed, so ids cannot be probed.

The root process never opens a user path: a job's logs (in the user's home) are read by a
child running as the account (:data:`LOG_READER`, through ``setpriv`` as CRIU is).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ams import LocalAccount
from ..control.protocol import error_reply, one_line  # one_line: the one sanitiser of peer text
from . import criu
from .imagefs import remove_path
from .images import ImageError, ImageInfo, ImageStore, Owner
from .jobs import JOBS_DIR, Job, JobError, JobManager, process_alive
from .manifest import ID_RE
from .migimage import MigrationLedger

log = logging.getLogger(__name__)

#: Job ids are made by JobManager ('j' + 10 hex); image ids by the image store.
JOB_ID = re.compile(r'^j[0-9a-f]{10}\Z')
IMAGE_ID = ID_RE
UPLOAD_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,123}\.tar\Z')
#: At most this much of each log is returned (the end of it).
LOG_CAP = 1 << 20
MAX_ARGV = 256
MAX_ARG_LEN = 8192
MAX_ENV = 64
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,63}\Z')
KILL_SIGNALS = {name: getattr(signal, 'SIG' + name)
                for name in ('TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2')}
#: How long ``kill`` waits for the job to end before it answers (``ended`` says which).
KILL_WAIT = 5.0
#: Upload results are kept this long for ``imported``.
UPLOAD_RESULT_TTL = 3600.0
MAX_UPLOAD_RESULTS = 4096
#: Ops that need CRIU; with no usable CRIU they answer ``criu-unavailable``.
NEEDS_CRIU = frozenset({'run', 'checkpoint', 'restart'})
#: Ops that start a job: refused ``too-many-jobs`` at ``max_jobs_per_account`` running jobs.
STARTS_JOB = frozenset({'run', 'restart'})

#: Runs as the account (``python3 -I -S -c LOG_READER DIR CAP``): the end of the job's two log
#: files, as JSON.  Only the standard library, no site: any account can run the system python.
LOG_READER = r'''
import json, os, stat, sys
d, cap = sys.argv[1], int(sys.argv[2])
out = {}
for name in ("stdout", "stderr"):
    try:
        fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        out[name] = ["", 0]
        continue
    except OSError as exc:
        out[name] = [None, exc.strerror]
        continue
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        out[name] = [None, "not a regular file"]
        continue
    start = max(0, st.st_size - cap)
    chunks, left = [], st.st_size - start
    os.lseek(fd, start, 0)
    while left > 0:
        b = os.read(fd, min(left, 1 << 16))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    data = b"".join(chunks)
    if start:  # do not start in the middle of a UTF-8 sequence
        i = 0
        while i < min(4, len(data)) and data[i] & 0xC0 == 0x80:
            i += 1
        data = data[i:]
    out[name] = [data.decode("utf-8", "replace"), st.st_size]
sys.stdout.write(json.dumps(out))
'''


class CRError(Exception):
    """A refusal of the service itself (not of the job manager or image store)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """Who asks: the VO identity (``owner``: vo, user) and the local account it maps to.

    ``route`` (``ssh`` or ``local``) and ``source`` (peer address, or ``pid N``) are for the
    audit log only.
    """

    owner: Owner
    account: LocalAccount
    route: str = 'ssh'
    source: str = ''


class CRService:
    """The cr operations of one gateway.

    *jobs* may be ``None`` when no usable CRIU was found (``unavailable`` says why): the ops
    that need CRIU (:data:`NEEDS_CRIU`) then answer ``criu-unavailable``, the others work.
    """

    def __init__(self, jobs: JobManager, images: ImageStore, audit: Any, *,
                 criu_version: str = '', unavailable: str = '',
                 reader_python: str = criu.DEFAULT_INIT_PYTHON,
                 job_env: Mapping[str, str] | None = None) -> None:
        self.jobs = jobs
        self.images = images
        self.audit = audit
        self.criu_version = criu_version
        self.unavailable = unavailable
        self.reader_python = reader_python
        self.job_env = dict(job_env or {})
        self._uploads: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}
        #: ``[limits] max_jobs_per_account`` (0: no limit), set by the gateway.
        self.max_jobs = 0
        self._start_locks: dict[int, asyncio.Lock] = {}
        #: Job id -> the operation that has it (checkpoint, kill, migration): see job_op.
        self._job_ops: dict[str, str] = {}
        #: This gateway's incoming bytes per account: live migration streams (cr/migrate.py)
        #: and xos-images uploads (cr/sftp.py), and what each has staged on disk.
        self.migrations = MigrationLedger()
        self._handlers = {
            'run': self._run, 'list': self._list, 'logs': self._logs, 'kill': self._kill,
            'checkpoint': self._checkpoint, 'restart': self._restart, 'images': self._images,
            'image': self._image, 'rm': self._rm, 'imported': self._imported,
            'caps': self._caps,
        }
        #: The node's migration capabilities (cr/migcaps.py MigrationProbe), set by CRRuntime.
        self.migration: Any = None

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    # --- the one entry point --------------------------------------------------------------

    async def handle(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one request for *caller*; never raises (a bug becomes ``internal-error``)."""
        op = request.get('op') if isinstance(request, Mapping) else None
        if not isinstance(op, str):
            return error_reply('bad-request', 'request lacks a string "op"')
        op = op.removeprefix('cr.')
        handler = self._handlers.get(op)
        if handler is None:
            return error_reply('unknown-op', f'unknown op {op[:64]!r}')
        started = time.monotonic()
        try:
            if op in NEEDS_CRIU and self.unavailable:
                raise CRError('criu-unavailable', f'checkpoint/restart is not available on '
                              f'this node: {self.unavailable}')
            if op in STARTS_JOB:
                async with self.starting_job(caller):
                    return {'ok': True, **await handler(caller, request)}
            return {'ok': True, **await handler(caller, request)}
        except (CRError, JobError, ImageError) as exc:
            return self._refused(caller, op, request, exc.reason, str(exc), started, exc)
        except criu.CriuError as exc:
            return self._refused(caller, op, request, 'criu-failed', str(exc), started, exc)
        except Exception:
            log.exception('cr: %s for %s failed', op, caller.account.name)
            try:
                self._refused(caller, op, request, 'internal-error', 'a bug: see the gateway log',
                              started)
            except Exception:  # the audit log itself failing: already logged above
                pass
            return error_reply('internal-error', f'{op} failed inside xos-sshd (see its log)')

    def _refused(self, caller: Caller, op: str, request: Mapping[str, Any], reason: str,
                 message: str, started: float | None = None,
                 exc: BaseException | None = None) -> dict[str, Any]:
        """Audit a refusal (with how long it took and what the op had learnt: an exception's
        ``audit_fields``, e.g. a restart's ``migrated``) and answer it."""
        if op not in ('list', 'images', 'logs', 'image', 'imported'):
            extra = dict(getattr(exc, 'audit_fields', None) or {})
            if started is not None:
                extra['seconds'] = round(time.monotonic() - started, 3)
            self._audit(caller, op, 'refused', reason=reason, message=one_line(message),
                        job=_safe(request.get('job')), image=_safe(request.get('image')),
                        **extra)
        return error_reply(reason, message)

    def _audit(self, caller: Caller, action: str, outcome: str = 'ok', **fields: Any) -> None:
        self.audit.write('cr', action=action, outcome=outcome, vo=caller.owner.vo,
                         user=caller.owner.user, account=caller.account.name,
                         uid=caller.account.uid, route=caller.route, source=caller.source,
                         **{k: v for k, v in fields.items() if v is not None})

    # --- field checks ---------------------------------------------------------------------

    @staticmethod
    def _id(request: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
        value = request.get(key)
        if not isinstance(value, str):
            raise CRError('bad-request', f'field {key!r} (the {what} id) is required')
        if not pattern.match(value):
            raise CRError(f'no-such-{what}', f'no {what} {value[:80]!r}')
        return value

    @staticmethod
    def _flag(request: Mapping[str, Any], key: str, default: bool = False) -> bool:
        value = request.get(key, default)
        if not isinstance(value, bool):
            raise CRError('bad-request', f'field {key!r} must be true or false')
        return value

    # --- one way to start a job, one operation per job at a time ---------------------------

    @contextlib.asynccontextmanager
    async def starting_job(self, caller: Caller) -> AsyncIterator[None]:
        """Start a job for *caller* inside this: ``run``, ``restart`` and a migration's
        restore alike.  With ``max_jobs`` set, it holds the account's start lock and refuses
        ``too-many-jobs`` at the limit (:meth:`_check_job_limit`), so no two starts (whatever
        transport or op) can pass the limit together."""
        if not self.max_jobs:
            yield
            return
        async with self._start_locks.setdefault(caller.account.uid, asyncio.Lock()):
            await self._check_job_limit(caller)
            yield

    def check_job_free(self, job_id: str) -> None:
        """Refuse (``job-busy``, at once: nobody waits) when another operation has the job."""
        busy = self._job_ops.get(job_id)
        if busy is not None:
            raise CRError('job-busy', f'job {job_id} is busy: {busy} in progress; try again '
                          f'once it is over')

    @contextlib.contextmanager
    def job_op(self, job_id: str, what: str) -> Iterator[None]:
        """Have job *job_id* for operation *what* (``checkpoint``, ``kill``, ``migration``)
        while inside this: a checkpoint, a kill or a migration of a job that another of them
        has is refused ``job-busy`` (:meth:`check_job_free`) instead of racing it (a thaw at
        the wrong moment, a job killed while its copy restores).  Take it only for the
        caller's own job (after :meth:`job_of`): the refusal names the job."""
        self.check_job_free(job_id)
        self._job_ops[job_id] = what
        try:
            yield
        finally:
            del self._job_ops[job_id]

    # --- ownership --------------------------------------------------------------------------

    async def _check_job_limit(self, caller: Caller) -> None:
        """Refuse to start a job when the account runs ``max_jobs`` on this node already
        (run and restart, whichever transport: one check, held under the account's lock)."""
        running = [j for j in await self.jobs.table.list(uid=caller.account.uid,
                                                         states=['starting', 'running'])
                   if j.node == self.jobs.node]
        if len(running) >= self.max_jobs:
            raise CRError('too-many-jobs', f'{caller.account.name} runs {len(running)} jobs '
                          f'already (max_jobs_per_account = {self.max_jobs}): wait for one '
                          f'to end or stop one with xos-cr kill')

    async def job_of(self, caller: Caller, job_id: str) -> Job:
        """The caller's job *job_id*; ``no-such-job`` for anybody else's (or none)."""
        job = await self.jobs.table.get(job_id)
        if (job is None or job.uid != caller.account.uid or job.vo != caller.owner.vo
                or job.vo_user != caller.owner.user):
            raise JobError('no-such-job', f'no job {job_id}')
        return job

    async def image_of(self, caller: Caller, image_id: str) -> ImageInfo:
        """The caller's image *image_id* (ImageInfo); ``no-such-image`` otherwise."""
        info = await self.images.get(caller.account.uid, image_id)
        if info.uid != caller.account.uid or info.owner != caller.owner:
            raise CRError('no-such-image', f'no image {image_id}')
        return info

    # --- ops --------------------------------------------------------------------------------

    async def _run(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        argv = request.get('argv')
        if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGV
                or not all(isinstance(a, str) and len(a) <= MAX_ARG_LEN and '\0' not in a
                           for a in argv)):
            raise CRError('bad-request', f'field "argv" must be a non-empty list of at most '
                          f'{MAX_ARGV} strings')
        env = request.get('env') or {}
        if (not isinstance(env, dict) or len(env) > MAX_ENV
                or not all(isinstance(k, str) and isinstance(v, str) and ENV_NAME.match(k)
                           and not k.startswith('XOS_') and '\0' not in v
                           and len(v) <= MAX_ARG_LEN for k, v in env.items())):
            raise CRError('bad-request', 'field "env" must map variable names (not XOS_*) '
                          'to strings')
        job = await self.jobs.start(caller.account, argv, {**env, **self.job_env})
        self._audit(caller, 'run', job=job.id, command=argv[:16], pid=job.pid)
        return {'job': job.as_dict()}

    async def _list(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        jobs = await self.jobs.table.list(uid=caller.account.uid, vo=caller.owner.vo,
                                          vo_user=caller.owner.user)
        return {'jobs': [j.as_dict() for j in jobs]}

    async def _logs(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        job_id = self._id(request, 'job', JOB_ID, 'job')
        cap = request.get('max_bytes', LOG_CAP)
        if not isinstance(cap, int) or isinstance(cap, bool) or not 0 < cap <= LOG_CAP:
            raise CRError('bad-request', f'field "max_bytes" must be between 1 and {LOG_CAP}')
        job = await self.job_of(caller, job_id)
        self.jobs.here(job)  # its log files are on its node
        got = await self.read_logs(caller.account, job.log_dir, cap)
        reply: dict[str, Any] = {'job': job.id, 'truncated': {}}
        for name in ('stdout', 'stderr'):
            text, size = got.get(name, ['', 0])
            if text is None:
                raise CRError('logs-unavailable', f'cannot read the {name} of job {job.id}: {size}')
            reply[name] = text
            reply[f'{name}_size'] = size
            reply['truncated'][name] = size > cap
        return reply

    async def read_logs(self, account: LocalAccount, log_dir: str, cap: int) -> dict[str, Any]:
        """The end of ``log_dir``'s stdout and stderr, read by a child running as *account*."""
        argv = criu.as_user(account, (), [self.reader_python, '-I', '-S', '-c', LOG_READER,
                                          log_dir, str(cap)])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd='/', env={'PATH': criu.CRIU_ENV['PATH']},
            start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CRError('logs-unavailable', 'reading the logs took too long') from None
        if proc.returncode != 0:
            raise CRError('logs-unavailable', f'cannot read the logs as {account.name}: '
                          f'{err.decode(errors="replace").strip()[-300:]}')
        return json.loads(out)

    async def _kill(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        job_id = self._id(request, 'job', JOB_ID, 'job')
        name = request.get('signal', 'TERM')
        if not isinstance(name, str) or name.upper().removeprefix('SIG') not in KILL_SIGNALS:
            raise CRError('bad-request', f'field "signal" must be one of {", ".join(KILL_SIGNALS)}')
        name = name.upper().removeprefix('SIG')
        job = await self.job_of(caller, job_id)
        with self.job_op(job.id, 'kill'):
            job = await self.jobs.kill(job.id, caller.account, KILL_SIGNALS[name])
            ended = await self._wait_ended(job, KILL_WAIT if name in ('TERM', 'KILL', 'INT', 'HUP', 'QUIT') else 0)
            if ended and job.state == 'running':
                await self.jobs.table.update(job.id, expect_state='running', state='killed',
                                             ended=time.time(), detail=f'SIG{name} by request')
        self._audit(caller, 'kill', job=job.id, signal=name, ended=ended)
        got = await self.jobs.table.get(job.id)
        return {'job': (got or job).as_dict(), 'ended': ended}

    @staticmethod
    async def _wait_ended(job: Job, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not process_alive(job.pid, job.starttime, job.uid):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _checkpoint(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        job_id = self._id(request, 'job', JOB_ID, 'job')
        stop = self._flag(request, 'stop')
        job = await self.job_of(caller, job_id)
        await self._quota_preflight(caller)
        dumped = False

        async def commit(image_id: str, images_dir: str) -> ImageInfo:
            nonlocal dumped
            dumped = True
            try:
                return await self.images.commit(images_dir, caller.account, caller.owner,
                                                job.id, tuple(job.command), self.criu_version)
            except BaseException:
                await asyncio.to_thread(remove_path, images_dir)  # never follows the account's links
                raise

        try:  # with stop, the job ends only once the image is committed (JobManager)
            with self.job_op(job.id, 'checkpoint'):
                ck = await self.jobs.checkpoint(job.id, caller.account, stop=stop, commit=commit)
        except (CRError, JobError, ImageError) as exc:
            if not stop or not (dumped or exc.reason == 'checkpoint-failed'):
                raise
            # The dump failed or the store refused the image (byte quota...): the job was
            # thawed and runs on (JobManager.checkpoint).
            running = process_alive(job.pid, job.starttime, job.uid)
            first, nl, rest = str(exc).partition('\n')  # a CRIU log tail stays last
            refusal = CRError(exc.reason, f'{first}; job {job.id} '
                              f'{"still runs" if running else "is not running any more"}{nl}{rest}')
            refusal.audit_fields = {'running': running}  # type: ignore[attr-defined]
            raise refusal from exc
        info: ImageInfo = ck.committed
        if info.id != ck.image_id:
            await self.jobs.table.update(job.id, last_image=info.id)
        self._audit(caller, 'checkpoint', job=job.id, image=info.id, stop=stop,
                    seconds=round(ck.seconds, 3), size_bytes=info.size_bytes)
        got = await self.jobs.table.get(job.id)
        return {'image': info.as_dict(), 'job': (got or ck.job).as_dict(),
                'seconds': round(ck.seconds, 3)}

    async def _quota_preflight(self, caller: Caller) -> None:
        """Refuse a checkpoint the image store would refuse anyway for the image count, before
        anything is dumped (the job is not even frozen for nothing; the byte quota can only
        be known after the dump, and a ``--stop`` job then goes on: see ``_checkpoint``)."""
        limit = getattr(self.images, 'quota_count', None)
        if isinstance(limit, int) and limit > 0:
            have = len(await self.images.list(caller.account.uid))
            if have >= limit:
                raise CRError('quota-exceeded', f'{caller.account.name} already has {have} '
                              f'images (quota {limit}): remove some with xos-cr rm')

    async def _restart(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        image_id = self._id(request, 'image', IMAGE_ID, 'image')
        logs_of = request.get('logs_of')
        if logs_of is not None and (not isinstance(logs_of, str) or not JOB_ID.match(logs_of)):
            raise CRError('bad-request', 'field "logs_of" must be a job id')
        info = await self.image_of(caller, image_id)
        parent: Job | None = None
        if info.job_id:
            try:
                parent = await self.job_of(caller, info.job_id)
            except JobError:
                parent = None  # an image from another node (migrated): no local parent
        # An image another node took: restarting it here is the end of a migration.
        migrated = bool(info.node) and info.node != self.jobs.node
        try:
            images_dir = await self.images.restore_dir(caller.account, caller.owner, image_id)
            started = time.monotonic()
            try:
                job = await self.jobs.restore(str(images_dir), caller.account, image_id=image_id,
                                              parent_job=parent.id if parent else None)
            finally:
                try:
                    await self.images.release_restore_dir(images_dir)
                except (OSError, ValueError) as exc:
                    log.warning('could not remove restore directory %s: %s', images_dir, exc)
            seconds = time.monotonic() - started
        except Exception as exc:  # the refusal's audit line says which image it was
            exc.audit_fields = {'image_node': info.node, 'migrated': migrated}  # type: ignore[attr-defined]
            raise
        if parent is None:
            # The restored processes write to the files their image names: the log directory
            # of the job the image was taken of (``logs_of`` when that job was itself restored).
            log_job = logs_of or info.job_id
            log_dir = (os.path.join(caller.account.home, JOBS_DIR, log_job)
                       if log_job and JOB_ID.match(log_job) else job.job_dir)
            await self.jobs.table.update(job.id, command=json.dumps(list(info.command)),
                                         log_dir=log_dir)
            job = await self.jobs.table.get(job.id) or job
        self._audit(caller, 'restart', job=job.id, image=image_id, pid=job.pid,
                    parent_job=parent.id if parent else None, image_node=info.node,
                    migrated=migrated, seconds=round(seconds, 3), size_bytes=info.size_bytes)
        return {'job': job.as_dict()}

    async def _caps(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        """``caps {job?}``: the migration modes this node can send and receive (with a job:
        for that job, whose memory bounds lazy pages); see cr/migcaps.py."""
        from .migcaps import caps_reply
        return await caps_reply(self, caller, request)

    async def _images(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        infos = await self.images.list(caller.account.uid)
        return {'images': [i.as_dict() for i in infos if i.owner == caller.owner]}

    async def _image(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        info = await self.image_of(caller, self._id(request, 'image', IMAGE_ID, 'image'))
        return {'image': info.as_dict()}

    async def _rm(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        info = await self.image_of(caller, self._id(request, 'image', IMAGE_ID, 'image'))
        await self.images.remove(caller.account.uid, info.id)
        self._audit(caller, 'rm', image=info.id, size_bytes=info.size_bytes)
        return {'image': info.id}

    # --- archives (get/put): used by the local socket and the xos-images subsystem ----------

    async def export_archive(self, caller: Caller, image_id: str) -> Path:
        """The path of the caller's image as one archive (``images.export_archive``); give
        it back with :meth:`release_export` once sent."""
        if not IMAGE_ID.match(image_id):
            raise CRError('no-such-image', f'no image {image_id[:80]!r}')
        info = await self.image_of(caller, image_id)
        path = await self.images.export_archive(caller.account.uid, info.id)
        self._audit(caller, 'export', image=info.id, size_bytes=info.size_bytes)
        return path

    async def release_export(self, path: Path) -> None:
        """Delete an archive :meth:`export_archive` made, once sent."""
        try:
            await self.images.release_export(path)
        except (OSError, ValueError) as exc:
            log.warning('could not remove export %s: %s', path, exc)

    async def import_archive(self, caller: Caller, fileobj: Any, upload: str = '', *,
                             charge: Any = None) -> ImageInfo:
        """Verify and store an uploaded archive as the caller's image; return its ImageInfo.
        *charge*: see ``ImageStore.import_archive`` (a migration's staged bytes)."""
        try:
            info = await self.images.import_archive(caller.account, caller.owner, fileobj,
                                                    charge=charge)
        except ImageError as exc:
            self._audit(caller, 'import', 'refused', reason=exc.reason,
                        message=one_line(str(exc)), upload=upload or None)
            raise
        self._audit(caller, 'import', image=info.id, upload=upload or None,
                    image_node=info.node, size_bytes=info.size_bytes)
        return info

    def record_upload(self, caller: Caller, name: str, result: dict[str, Any]) -> None:
        """Keep what an ``xos-images`` upload became, for ``imported``."""
        now = time.monotonic()
        for key in [k for k, (t, _) in self._uploads.items() if now - t > UPLOAD_RESULT_TTL]:
            del self._uploads[key]
        while len(self._uploads) >= MAX_UPLOAD_RESULTS:  # oldest first (insertion order)
            del self._uploads[next(iter(self._uploads))]
        self._uploads.pop((caller.account.uid, name), None)
        self._uploads[(caller.account.uid, name)] = (now, result)

    async def _imported(self, caller: Caller, request: Mapping[str, Any]) -> dict[str, Any]:
        name = request.get('upload')
        if not isinstance(name, str) or not UPLOAD_NAME.match(name):
            raise CRError('bad-request', 'field "upload" must be the name of an uploaded .tar')
        entry = self._uploads.get((caller.account.uid, name))
        if entry is None:
            raise CRError('no-such-upload', f'no finished upload {name!r}')
        result = entry[1]
        if not result.get('ok'):
            raise CRError(result.get('reason', 'bad-archive'), result.get('error', 'import failed'))
        return {'image': result['image']}

    # --- gateway side: periodic refresh ----------------------------------------------------

    async def refresh(self, reaped: Mapping[int, int] | None = None) -> list[Job]:
        """Mark this node's running jobs whose init is gone as ``exited`` (as
        ``JobManager.poll``, but only for this node: a shared job table holds other nodes'
        jobs too), with the exit code when the gateway reaped the init (*reaped*: pid ->
        code, from :class:`~xos_sshd.cr.reaper.Reaper`)."""
        reaped = reaped or {}
        ended = []
        for job in await self.jobs.table.list(states=['running']):
            if job.node != self.jobs.node or process_alive(job.pid, job.starttime, job.uid):
                continue
            if job.pid not in reaped and _our_zombie(job.pid):
                continue  # reaped (with its exit code) at the next poll
            fields: dict[str, Any] = {'state': 'exited', 'ended': time.time()}
            if job.pid in reaped:
                fields['exit_code'] = reaped[job.pid]
            if await self.jobs.table.update(job.id, expect_state='running', **fields):
                ended.append(job)
                log.info('job %s of %s ended (exit code %s)', job.id, job.account,
                         fields.get('exit_code', 'unknown'))
                self.audit.write('cr', action='ended', outcome='ok', route='node', vo=job.vo,
                                 user=job.vo_user, account=job.account, uid=job.uid,
                                 job=job.id, pid=job.pid, exit_code=fields.get('exit_code'),
                                 seconds=round(fields['ended'] - job.created, 3))
        return ended


def _our_zombie(pid: int | None) -> bool:
    """Whether *pid* is a zombie child of this process (not reaped yet)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError, TypeError):
        return False
    return fields[0] == 'Z' and fields[1] == str(os.getpid())


def _safe(value: Any) -> str | None:
    return one_line(value, 80) if isinstance(value, str) else None


def caller_for(identity_or_account: Any, account: LocalAccount, owner_type: Any, *,
               route: str, source: str) -> Caller:
    """A :class:`Caller` for an SSH identity (``vo``, ``user``) or an account (``vo``,
    ``vo_user``)."""
    user = getattr(identity_or_account, 'user', None) or identity_or_account.vo_user
    return Caller(owner_type(identity_or_account.vo, user), account, route, source)
