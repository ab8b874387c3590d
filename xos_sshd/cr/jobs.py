"""Jobs: process trees started as a mapped account, detached, checkpointable with CRIU.

A job (design: "Checkpoint / restart") runs as its :class:`~xos_sshd.ams.LocalAccount` in
its own PID + mount namespace (built by :mod:`xos_sshd.cr.nsjob`): pid 1 is the job init
(:mod:`xos_sshd.cr.jobinit`, no capabilities, no_new_privs), the command is pid 2, leads its
own session, has cwd = home, stdin ``/dev/null`` and stdout/stderr appended to
``~/.xos-jobs/<job-id>/stdout|stderr``, a directory the init creates as the account.  The job
does not depend on the gateway process: it survives logout and gateway restarts.

The job table lives in the AMS store (migration 2 of :mod:`xos_sshd.ams.store`);
:class:`JobTable` is its small async repository, :class:`JobManager` the operations:
``start``, ``checkpoint`` (refuses with the reason what CRIU cannot carry, see
:mod:`xos_sshd.cr.fdscan`), ``restore``, ``kill``, ``poll`` (notice ended jobs) and
``reconcile`` (at gateway start: running rows whose process is gone become ``lost``).

Images: a checkpoint is written by CRIU, as the account, into
``<spool_dir>/<uid>/<image-id>/``.  ``spool_dir`` and ``<uid>`` are root-owned 0711 and
created here; the image directory is created by root inside them and then given to the
account (0700), so root never follows a path the user controls and a finished image can
be moved into the root-owned image store by a plain ``rename`` (same filesystem).

A restored job writes to the files its image names, i.e. the stdout/stderr of the job that
was checkpointed (``log_dir``); its own job directory only gets the init's ``exit-status``.

Processes that use the application API (:mod:`xos_sshd.cr.api`, root side
:mod:`xos_sshd.cr.apictl`) hear of a checkpoint before the dump (critical sections may delay
it up to ``api_timeout``, callbacks run) and of its outcome after it; a restore tells them
``restart``; :meth:`JobManager.checkpoint_requests` finds jobs that asked to be checkpointed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ams import LocalAccount
from ..ams.store import Store
from ..session.spawn import child_rlimits
from . import apictl, criu
from .fdscan import NotCheckpointable, host_pid_of, process_table, scan
from .imagefs import remove_path
from .nsjob import start_time

#: The ``detail`` of a job restored with lazy pages whose memory is still being pulled from
#: the source.  Such a job must not outlive its gateway: if the gateway stops before the pull
#: completed, pages never pulled would read as zeros, so :func:`reconcile` kills it.
LAZY_PULL_DETAIL = 'memory still arriving from the source (lazy pages)'

JOB_STATES = ('starting', 'running', 'checkpointed', 'exited', 'killed', 'lost', 'failed')
JOBS_DIR = '.xos-jobs'
DEFAULT_PATH = '/usr/local/bin:/usr/bin:/bin'
#: How long a job's critical sections (xos_sshd.cr.api) may delay a checkpoint by default.
API_TIMEOUT = 30.0


class JobError(Exception):
    """A job operation was refused or failed.  ``reason`` is a stable code:
    ``no-such-job``, ``not-owner``, ``not-running``, ``other-node`` (a job of a shared job
    table that runs on another node: the message names it), ``not-checkpointable``,
    ``start-failed``, ``checkpoint-failed``, ``restore-failed``; and from the job's use of
    the application API: ``critical-section`` (one was still open at the bound; the
    message names it), ``refused-by-job`` (a checkpoint callback failed or hung)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table."""

    id: str
    vo: str
    vo_user: str
    role: str
    account: str
    uid: int
    node: str
    state: str
    command: tuple[str, ...]
    created: float
    updated: float
    ended: float | None
    pid: int | None
    starttime: int | None
    root_pid: int | None
    job_dir: str
    log_dir: str
    exit_code: int | None
    restored_from: str | None
    parent_job: str | None
    last_image: str | None
    detail: str

    @property
    def namespace(self) -> criu.JobNamespace:
        if self.pid is None or self.starttime is None:
            raise JobError('not-running', f'job {self.id} has no process')
        return criu.JobNamespace(self.pid, self.starttime)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form for listings (``--json``)."""
        d = dict(self.__dict__)
        d['command'] = list(self.command)
        return d


@dataclass(frozen=True)
class Checkpoint:
    """A finished dump: where CRIU wrote it and how long the job was frozen for it;
    ``api_participants`` processes used the application API, and waiting for them (critical
    sections, callbacks) took ``api_wait`` seconds before the dump.  ``committed``: what the
    *commit* step given to :meth:`JobManager.checkpoint` returned (the stored image)."""

    job: Job
    image_id: str
    images_dir: str
    seconds: float
    log: str
    api_participants: int = 0
    api_wait: float = 0.0
    committed: Any = None


@dataclass(frozen=True)
class CheckpointRequest:
    """A job that asked for a checkpoint of itself (``api.request_checkpoint``)."""

    job: Job
    stop: bool


def _row_to_job(row: Any) -> Job:
    d = {k: row[k] for k in row.keys()}  # noqa: SIM118 (iterating a Row yields values)
    d['command'] = tuple(json.loads(d['command']))
    return Job(**d)


class JobTable:
    """Async repository of the ``jobs`` table (one transaction per call)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, job: Job) -> None:
        d = job.as_dict()
        d['command'] = json.dumps(d['command'])
        cols = ', '.join(d)
        async with self.store.write() as txn:
            await txn.execute(f'INSERT INTO jobs ({cols}) VALUES ({", ".join("?" * len(d))})',
                              list(d.values()))

    async def get(self, job_id: str) -> Job | None:
        async with self.store.read() as txn:
            row = await txn.one('SELECT * FROM jobs WHERE id = ?', (job_id,))
        return None if row is None else _row_to_job(row)

    async def list(self, *, uid: int | None = None, states: Iterable[str] | None = None,
                   vo: str | None = None, vo_user: str | None = None,
                   node: str | None = None) -> list[Job]:
        """Jobs by creation; every filter given must match (*node*: the jobs of that node)."""
        where, args = [], []  # type: list[str], list[Any]
        for col, val in (('uid', uid), ('vo', vo), ('vo_user', vo_user), ('node', node)):
            if val is not None:
                where.append(f'{col} = ?')
                args.append(val)
        if states is not None:
            st = list(states)
            where.append(f'state IN ({", ".join("?" * len(st))})')
            args += st
        sql = 'SELECT * FROM jobs' + (' WHERE ' + ' AND '.join(where) if where else '')
        async with self.store.read() as txn:
            rows = await txn.all(sql + ' ORDER BY created, id', args)
        return [_row_to_job(r) for r in rows]

    async def counts(self, *, node: str | None = None) -> dict[str, int]:
        """How many jobs (of *node*, or of every node) are in each state (metrics)."""
        sql, args = 'SELECT state, COUNT(*) FROM jobs', []  # type: str, list[Any]
        if node is not None:
            sql, args = sql + ' WHERE node = ?', [node]
        async with self.store.read() as txn:
            rows = await txn.all(sql + ' GROUP BY state', args)
        return {r[0]: int(r[1]) for r in rows}

    async def update(self, job_id: str, *, expect_state: str | None = None,
                     expect_node: str | None = None, **fields: Any) -> bool:
        """Set *fields* (and ``updated``); with *expect_state*, only if the row is in it; with
        *expect_node*, only if it is a job of that node (a shared job table holds other
        nodes' jobs, whose processes this node cannot see)."""
        if 'state' in fields and fields['state'] not in JOB_STATES:
            raise ValueError(f'unknown job state {fields["state"]!r}')
        fields['updated'] = time.time()
        sets = ', '.join(f'{k} = ?' for k in fields)
        sql, args = f'UPDATE jobs SET {sets} WHERE id = ?', [*fields.values(), job_id]
        if expect_state is not None:
            sql += ' AND state = ?'
            args.append(expect_state)
        if expect_node is not None:
            sql += ' AND node = ?'
            args.append(expect_node)
        async with self.store.write() as txn:
            return await txn.execute(sql, args) == 1


def process_alive(pid: int | None, starttime: int | None, uid: int) -> bool:
    """Whether *pid* still is the job init we started: same start time, same uid, not a zombie."""
    if pid is None or starttime is None:
        return False
    try:
        if start_time(pid) != starttime or os.stat(f'/proc/{pid}').st_uid != uid:
            return False
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state not in ('Z', 'X')


def job_environment(account: LocalAccount, job_id: str,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment: clean, from the account (as a session's), plus ``XOS_JOB_ID``."""
    env = {'HOME': account.home, 'USER': account.name, 'LOGNAME': account.name,
           'SHELL': account.shell, 'PATH': DEFAULT_PATH, 'XOS_VO': account.vo,
           'XOS_USER': account.vo_user, 'XOS_ROLE': account.role or '', 'XOS_JOB_ID': job_id,
           # The application API, importable by path from any python3 (stdlib only).
           'XOS_CR_API': apictl.API_PATH}
    env.update(extra or {})
    return env


def _root_dir(path: str, mode: int) -> None:
    """Create (or check) a root-owned directory not writable by others."""
    os.makedirs(path, mode, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise JobError('checkpoint-failed', f'{path} must be a root-owned directory not '
                       'writable by others')


class JobManager:
    """The job operations of one node.  ``spool_dir``: root-owned, where dumps are written
    (``STATE/cr-spool`` in the gateway); ``criu_path``: the config's ``criu_path``."""

    def __init__(self, table: JobTable, *, spool_dir: str, node: str = '',
                 criu_path: str | None = None,
                 init_python: str = criu.DEFAULT_INIT_PYTHON) -> None:
        self.table = table
        self.spool_dir = spool_dir
        self.node = node
        self.criu_path = criu_path
        self.init_python = init_python
        self._checkpointing: set[str] = set()  # job ids with a checkpoint under way
        #: ``[session] rlimits`` ``(name, soft, hard)``, set on every job started (not on a
        #: restore: CRIU gives the restored processes the limits they had).
        self.rlimits: Sequence[tuple[str, int, int]] = ()

    # -- helpers ---------------------------------------------------------------

    async def owned(self, job_id: str, account: LocalAccount) -> Job:
        """The job, if *account* owns it (else JobError: other users' jobs do not exist)."""
        job = await self.table.get(job_id)
        if job is None or job.uid != account.uid:
            raise JobError('no-such-job', f'no job {job_id}')
        return job

    async def running(self, job_id: str, account: LocalAccount) -> Job:
        """The account's running job *job_id* of this node, for an operation on its processes
        (kill, checkpoint, migration): ``not-running`` when it is not running; ``other-node``
        when it runs on another node of a shared job table (only that node's gateway can reach
        its processes: it is not ended, and is not marked so here)."""
        job = await self.owned(job_id, account)
        if job.state != 'running':
            raise JobError('not-running', f'job {job_id} is {job.state}')
        self.here(job)
        if not process_alive(job.pid, job.starttime, job.uid):
            await self._ended(job, 'exited')
            raise JobError('not-running', f'job {job_id} has ended')
        return job

    def here(self, job: Job) -> Job:
        """*job* if it is this node's; ``JobError('other-node')`` naming its node otherwise
        (its processes, and its log files, are on that node)."""
        if job.node != self.node:
            verb = 'runs' if job.state in ('starting', 'running') else 'ran'
            raise JobError('other-node', f'job {job.id} {verb} on node {job.node}; connect to '
                           f'that node')
        return job

    def _new_row(self, account: LocalAccount, job_id: str, command: Sequence[str], *,
                 log_dir: str | None = None, **extra: Any) -> Job:
        now = time.time()
        job_dir = os.path.join(account.home, JOBS_DIR, job_id)
        fields: dict[str, Any] = {
            'id': job_id, 'vo': account.vo, 'vo_user': account.vo_user,
            'role': account.role or '', 'account': account.name, 'uid': account.uid,
            'node': self.node, 'state': 'starting', 'command': tuple(command), 'created': now,
            'updated': now, 'ended': None, 'pid': None, 'starttime': None, 'root_pid': None,
            'job_dir': job_dir, 'log_dir': log_dir or job_dir, 'exit_code': None,
            'restored_from': None, 'parent_job': None, 'last_image': None, 'detail': ''}
        fields.update(extra)
        return Job(**fields)

    async def _ended(self, job: Job, state: str, detail: str = '') -> None:
        # Only a job of this node: whether another node's job still runs is that node's call.
        await self.table.update(job.id, expect_state=job.state, expect_node=self.node,
                                state=state, ended=time.time(),
                                **({'detail': detail} if detail else {}))

    def image_dir(self, account: LocalAccount, image_id: str) -> str:
        return os.path.join(self.spool_dir, str(account.uid), image_id)

    def _make_image_dir(self, account: LocalAccount, image_id: str) -> str:
        """``spool/<uid>/<image-id>/``: made by root in root-owned parents, then the account's."""
        _root_dir(self.spool_dir, 0o711)
        user_dir = os.path.join(self.spool_dir, str(account.uid))
        _root_dir(user_dir, 0o711)
        path = os.path.join(user_dir, image_id)
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, account.uid, account.gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return path

    # -- operations ------------------------------------------------------------

    async def start(self, account: LocalAccount, argv: Sequence[str],
                    env: Mapping[str, str] | None = None, timeout: float = 60.0) -> Job:
        """Start *argv* as a job of *account*; return the running job."""
        if not argv:
            raise JobError('start-failed', 'no command given')
        job_id = 'j' + secrets.token_hex(5)
        job = self._new_row(account, job_id, argv)
        await self.table.add(job)
        req = {'op': 'start', 'job_id': job_id, 'uid': account.uid, 'gid': account.gid,
               'groups': sorted(set(account.gids)), 'home': account.home,
               'job_dir': job.job_dir, 'python': self.init_python, 'argv': list(argv),
               'env': job_environment(account, job_id, env),
               'rlimits': child_rlimits(self.rlimits)}
        try:
            reply, log = await criu.run_helper(req, timeout)
        except criu.CriuError as exc:
            reply, log = {'ok': False, 'error': exc.reason}, exc.log
        if not reply.get('ok'):
            msg = f'cannot start job as {account.name}: {reply.get("error")}'
            await self.table.update(job_id, state='failed', ended=time.time(), detail=msg)
            raise JobError('start-failed', msg + (f' ({log.strip()})' if log.strip() else ''))
        await self.table.update(job_id, state='running', pid=reply['pid'],
                                starttime=reply['starttime'], root_pid=reply['root'])
        got = await self.table.get(job_id)
        assert got is not None
        return got

    async def checkpoint(self, job_id: str, account: LocalAccount, *, stop: bool = False,
                         extra_args: Sequence[str] = (), timeout: float = 600.0,
                         api_timeout: float = API_TIMEOUT,
                         dump_options: Mapping[str, Any] | None = None,
                         commit: Callable[[str, str], Awaitable[Any]] | None = None,
                         ) -> Checkpoint:
        """Dump the job into a new spool image directory; the job goes on unless *stop*.

        *commit(image_id, images_dir)* keeps the dump (the service's image store commit);
        its result is ``Checkpoint.committed``.  With *stop* the job is never lost: the dump
        leaves the tree frozen, *commit* runs, and only once it succeeded is the job's
        namespace killed (job ``checkpointed``); if the dump or *commit* fails in any way,
        the job is thawed (SIGCONT) and goes on where it was frozen, and the error is raised.
        Without *stop*, *commit* runs after the job went on.

        *dump_options* go to :func:`criu.dump` as they are (a migration's ``keep_stopped``,
        ``pass_fds``, ``images_ready``: see :mod:`xos_sshd.cr.migrate`).

        Processes of the job that use the application API are told first: the dump waits for
        their critical sections (at most *api_timeout* s, else ``critical-section``) and
        callbacks, and they hear ``continue`` (or ``aborted``) after it (with *stop*: only
        ``aborted``, when the job goes on after all).
        """
        job = await self.running(job_id, account)
        assert job.pid is not None and job.root_pid is not None
        table = process_table()
        root_host = host_pid_of(job.pid, job.root_pid, table)
        if root_host is None:
            raise JobError('not-running', f'job {job_id} has no process {job.root_pid} any more')
        self._checkpointing.add(job_id)
        try:
            # API hook 1: prepare (no participants: nothing happens, no cost).
            parts = apictl.job_participants(job.pid, table)
            api_wait = 0.0
            if parts:
                prep = await apictl.prepare(account, parts, timeout=api_timeout,
                                            hold=timeout + 60, python=self.init_python)
                api_wait = prep.seconds
                if not prep.ok:
                    reason = prep.reason(api_timeout)
                    await apictl.resume(account, parts, 'aborted', reason, self.init_python)
                    raise JobError(prep.kind, f'checkpoint of job {job_id} refused by the job: '
                                   f'{reason}')
            committed = None
            try:
                # With stop, a failed dump thaws the job itself (_dump).
                image_id, images_dir, res = await self._dump(job, account, root_host, stop,
                                                             extra_args, timeout, dump_options)
                if stop:  # the tree is frozen: keep the image first, then end the job
                    try:
                        committed = await commit(image_id, images_dir) if commit else None
                    except BaseException:
                        criu.thaw_namespace(job.namespace, job.uid)  # it goes on
                        raise
            except BaseException as exc:
                # API hook 2a: no checkpoint after all.
                if parts:
                    await apictl.resume(account, parts, 'aborted', str(exc).split('\n')[0],
                                        self.init_python)
                raise
            if stop:
                try:  # marked first: the poll loop would take a killed 'running' job for exited
                    await self._ended(job, 'checkpointed', f'stopped by checkpoint {image_id}')
                finally:
                    criu.kill_namespace(job.namespace, job.uid)
            elif parts:  # API hook 2b: the checkpoint was taken, the job goes on
                await apictl.resume(account, parts, 'continue', '', self.init_python)
        finally:
            self._checkpointing.discard(job_id)
        await self.table.update(job_id, last_image=image_id)
        if not stop and commit is not None:
            committed = await commit(image_id, images_dir)
        got = await self.table.get(job_id)
        assert got is not None
        return Checkpoint(got, image_id, images_dir, res.seconds, res.log, len(parts), api_wait,
                          committed)

    async def _dump(self, job: Job, account: LocalAccount, root_host: int, stop: bool,
                    extra_args: Sequence[str], timeout: float,
                    dump_options: Mapping[str, Any] | None = None,
                    ) -> tuple[str, str, criu.DumpResult]:
        """Refuse what CRIU cannot carry, then dump: ``(image id, images dir, result)``."""
        problems = await asyncio.to_thread(scan, job.pid, root_host)
        if problems:
            raise JobError('not-checkpointable', f'job {job.id} cannot be checkpointed: '
                           + str(NotCheckpointable(problems)))
        image_id = 'i' + secrets.token_hex(8)
        images_dir = self._make_image_dir(account, image_id)
        try:
            # Without leave_running the tree is left frozen (criu.dump): the caller ends it.
            res = await criu.dump(job.root_pid or 0, images_dir, account, leave_running=not stop,
                                  namespace=job.namespace, criu_path=self.criu_path,
                                  extra_args=extra_args, timeout=timeout, **(dump_options or {}))
        except BaseException as exc:  # CRIU failed, timed out or was cancelled
            if stop:  # CRIU resumes the tree when it fails; a CRIU killed midway may not
                criu.thaw_namespace(job.namespace, job.uid)
            if not isinstance(exc, criu.CriuError):
                raise
            remove_path(images_dir)  # the account's: never shutil.rmtree (imagefs.remove)
            raise JobError('checkpoint-failed',
                           f'checkpoint of job {job.id} failed: {exc}') from None
        return image_id, images_dir, res

    async def restore(self, images_dir: str, account: LocalAccount, *,
                      image_id: str | None = None, parent_job: str | None = None,
                      extra_args: Sequence[str] = (), timeout: float = 600.0) -> Job:
        """Restore the images in *images_dir* (readable by *account*) as a new job.

        *parent_job* (the job the image was taken of) gives the new row its command and log
        directory (the restored processes write to the files the image names).
        """
        parent = await self.owned(parent_job, account) if parent_job else None
        job_id = 'j' + secrets.token_hex(5)
        job = self._new_row(account, job_id, parent.command if parent else (),
                            log_dir=parent.log_dir if parent else None,
                            restored_from=image_id, parent_job=parent_job)
        await self.table.add(job)
        try:
            res = await criu.restore(images_dir, account, job_id=job_id, job_dir=job.job_dir,
                                     criu_path=self.criu_path, init_python=self.init_python,
                                     extra_args=extra_args, timeout=timeout)
        except criu.CriuError as exc:
            await self.table.update(job_id, state='failed', ended=time.time(), detail=exc.reason)
            raise JobError('restore-failed', str(exc)) from None
        await self.table.update(job_id, state='running', pid=res.pid, starttime=res.starttime,
                                root_pid=res.root, detail=f'restored in {res.seconds:.3f} s')
        # API hook 3: restored participants are still waiting for how their checkpoint went.
        # (They would notice the restart by themselves within 0.25 s; this makes it at once.)
        parts = await asyncio.to_thread(apictl.job_participants, res.pid)
        if parts:
            await apictl.resume(account, parts, 'restart', '', self.init_python)
        got = await self.table.get(job_id)
        assert got is not None
        return got

    async def kill(self, job_id: str, account: LocalAccount,
                   sig: int = signal.SIGTERM) -> Job:
        """Signal the job.  The init forwards SIGTERM/INT/HUP/QUIT/USR1/USR2 to the command's
        process group; SIGKILL ends the init and with it the whole namespace."""
        job = await self.running(job_id, account)
        assert job.pid is not None
        try:
            pidfd = os.pidfd_open(job.pid)
        except ProcessLookupError:
            await self._ended(job, 'exited')
            raise JobError('not-running', f'job {job_id} has ended') from None
        try:  # re-check after pinning the pid: it cannot be recycled under the pidfd
            if not process_alive(job.pid, job.starttime, job.uid):
                raise JobError('not-running', f'job {job_id} has ended')
            signal.pidfd_send_signal(pidfd, sig)
        finally:
            os.close(pidfd)
        if sig == signal.SIGKILL:
            await self._ended(job, 'killed', 'killed by request')
        got = await self.table.get(job_id)
        assert got is not None
        return got

    async def checkpoint_requests(self) -> list[CheckpointRequest]:
        """Running jobs of this node that asked for a checkpoint of themselves
        (``api.request_checkpoint``), found from /proc alone (thread names).  The gateway's
        periodic task checkpoints each for its owner as ``xos-cr checkpoint JOB [--stop]``
        would (image committed to the owner's images); the checkpoint clears the request.
        Jobs with a checkpoint under way are left out."""
        jobs = [j for j in await self.table.list(states=['running'], node=self.node)
                if j.id not in self._checkpointing
                and process_alive(j.pid, j.starttime, j.uid)]
        if not jobs:
            return []

        def find() -> list[CheckpointRequest]:
            table = process_table()
            out = []
            for job in jobs:
                asks = {p.request for p in apictl.job_participants(job.pid or 0, table)}
                if asks - {''}:
                    out.append(CheckpointRequest(job, stop='stop' in asks))
            return out
        return await asyncio.to_thread(find)

    async def poll(self) -> list[Job]:
        """Mark this node's running jobs whose init is gone as ``exited``; return them (for a
        periodic task of the gateway).  Other nodes' jobs (a shared job table) are theirs to
        watch: their processes are not visible here.  The exit status is in the job directory
        (user-written)."""
        ended = []
        for job in await self.table.list(states=['running'], node=self.node):
            if not process_alive(job.pid, job.starttime, job.uid):
                if await self.table.update(job.id, expect_state=job.state, expect_node=self.node,
                                           state='exited', ended=time.time()):
                    ended.append(job)
        return ended


async def reconcile(table: JobTable, node: str = '') -> dict[str, str]:
    """At gateway start: compare the table with the processes of this node.

    ``running`` rows whose init is gone (or is another process now) become ``lost``: the job
    ended while no gateway was watching.  A running job whose lazy-pages pull never
    completed (``LAZY_PULL_DETAIL``) is killed and becomes ``failed``: its memory has holes
    (the source thawed the original when the pull broke).  ``starting`` rows (a gateway died mid-start)
    become ``failed`` (the helper's pid was never recorded; such a job's init, if it got
    that far, runs on unrecorded: the lead may kill processes of the account not in the table).
    Returns ``{job id: new state}``.
    """
    changed: dict[str, str] = {}
    for job in await table.list(states=['running', 'starting'], node=node):
        if job.state == 'starting':
            new, detail = 'failed', 'gateway stopped while starting'
        elif not process_alive(job.pid, job.starttime, job.uid):
            new, detail = 'lost', 'gone at gateway start'
        elif job.detail == LAZY_PULL_DETAIL:
            criu.kill_namespace(job.namespace, job.uid)
            new, detail = 'failed', ('killed at gateway start: the gateway stopped before its '
                                     'memory arrived from the source (lazy pages)')
        else:
            continue
        if await table.update(job.id, expect_state=job.state, expect_node=node, state=new,
                              ended=time.time(), detail=detail):
            changed[job.id] = new
    return changed
