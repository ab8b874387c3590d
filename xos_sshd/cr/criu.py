"""Driving CRIU: find it, probe what it can do here, dump and restore as the job's own uid.

**CLI, not RPC.**  ``criu swrk`` needs the protobuf messages of CRIU's ``rpc.proto``: either
the ``protobuf`` runtime plus generated code pinned to one CRIU version, or a hand-written
encoder.  The CLI gives everything this project uses (``--leave-running``,
``--leave-stopped``, ``--restore-detached``, ``--lazy-pages``, ``--page-server``,
``--external``/``--inherit-fd``), costs ~10 ms more per operation than RPC (measured: dump
59 vs 48 ms, restore 42 vs 35 ms), and composes with the two things the job design needs
anyway: running CRIU through ``setpriv`` with exactly the ambient capabilities we grant, and
running it *inside* the job's namespaces (:mod:`xos_sshd.cr.nsjob`).  The RPC's phase
notifications (for the application API's callbacks) can come from ``--action-script`` when
needed.  CRIU logs (``-v4``) to stderr, which we capture: no log file is read back from a
directory the user can write to.

**Privileges.**  CRIU runs ``--unprivileged`` as the account (uid, gid, groups), with
``no_new_privs`` and only the ambient capabilities :data:`CAPS_DUMP` / :data:`CAPS_RESTORE`
(CAP_CHECKPOINT_RESTORE: measured to be enough here, see there).  Root cannot dump another uid's process
on this machine anyway (``Can't get rlimit 0`` without CAP_SYS_RESOURCE), and a restore run
this way can never hand a process more than its owner's credentials; the namespace helper
additionally checks every restored process before letting it run.

**Images** are written by CRIU as the account, into ``images_dir`` which must be a directory
the account can write (dump) or read (restore); the path is resolved by CRIU inside the
job's mount namespace (a copy of the host's, so any path on a filesystem mounted before the
job started works).  Every failure raises :class:`CriuError` with the reason and the tail of
CRIU's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..ams import LocalAccount

#: Where scripts/install-criu.sh puts CRIU unless XOS_CRIU_PREFIX says otherwise.
DEFAULT_PREFIX_CRIU = '/opt/xos-criu/bin/criu'
#: Ambient capabilities CRIU gets for a dump and for a restore.  Measured with this module's
#: layout (CRIU inside the job's namespaces, restore into a fresh PID namespace as the job's
#: pid 1's child): CAP_CHECKPOINT_RESTORE alone dumps and restores every job of the tests
#: (threads, pipes, files, socketpairs, zombies).  The issue's measurements needed sys_ptrace
#: and setpcap for another layout (CRIU outside the namespaces); they stay out until a test
#: shows a need (setpcap would be needed to restore a narrower bounding set than CRIU's).
CAPS_DUMP: tuple[str, ...] = ('checkpoint_restore',)
CAPS_RESTORE: tuple[str, ...] = ('checkpoint_restore',)
#: The system python3 that runs the job init as the account (see jobinit.py).
DEFAULT_INIT_PYTHON = '/usr/bin/python3'
SETPRIV = shutil.which('setpriv') or '/usr/bin/setpriv'
CRIU_ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C'}
LOG_TAIL_LINES = 25
UNSHARE = shutil.which('unshare') or '/usr/bin/unshare'


class CriuError(Exception):
    """A CRIU operation failed.  ``str(exc)`` has the reason and the tail of CRIU's log."""

    def __init__(self, message: str, log: str = '') -> None:
        self.reason = message
        self.log = log
        tail = log_tail(log)
        super().__init__(f'{message}\n--- criu log, last lines ---\n{tail}' if tail else message)


@dataclass(frozen=True)
class CriuInfo:
    """What :func:`probe` found.  ``features``: ``lazy_pages`` (userfaultfd usable by the
    probing user), ``page_server`` (always: it needs no kernel feature), ``soft_dirty``
    (memory change tracking, for pre-dump and ``--track-mem``)."""

    path: str
    version: tuple[int, ...]
    version_text: str
    check: str
    features: dict[str, bool] = field(default_factory=dict)
    unprivileged: bool = False


@dataclass(frozen=True)
class JobNamespace:
    """A job's namespaces, named by its init's host pid and start time (see nsjob.py)."""

    init_pid: int
    starttime: int


@dataclass(frozen=True)
class DumpResult:
    seconds: float
    log: str


@dataclass(frozen=True)
class RestoreResult:
    """``pid``: the new job init's host pid; ``root``: the restored tree's root pid inside the
    job's namespace; ``starttime``: the init's start time (for :class:`JobNamespace`)."""

    pid: int
    root: int
    starttime: int
    seconds: float
    log: str

    @property
    def namespace(self) -> JobNamespace:
        return JobNamespace(self.pid, self.starttime)


def log_tail(log: str, lines: int = LOG_TAIL_LINES) -> str:
    """CRIU's error lines (they explain the failure) plus the last lines of the log."""
    all_lines = [ln for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in all_lines if 'Error' in ln][:8]
    tail = all_lines[-lines:]
    head = [ln for ln in errors if ln not in tail]
    return '\n'.join(head + (['...'] if head else []) + tail)


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if 'Error (' in line:
            return re.sub(r'^\([0-9. ]+\)\s*', '', line).strip()
    return ''


_version_cache: dict[str, tuple[tuple[int, ...], str]] = {}


def criu_version(path: str) -> tuple[tuple[int, ...], str]:
    """``(version tuple, text)`` of the CRIU at *path*; raises CriuError if it does not run."""
    if path in _version_cache:
        return _version_cache[path]
    try:
        out = subprocess.run([path, '--version'], capture_output=True, text=True, timeout=30,
                             env=CRIU_ENV, check=False)
    except OSError as exc:
        raise CriuError(f'cannot run {path}: {exc.strerror}') from None
    m = re.search(r'Version:\s*([0-9][0-9.]*)', out.stdout)
    if out.returncode != 0 or not m:
        raise CriuError(f'{path} --version failed (exit status {out.returncode})',
                        out.stdout + out.stderr)
    version = tuple(int(p) for p in m.group(1).split('.') if p)
    _version_cache[path] = (version, m.group(1))
    return _version_cache[path]


def find_criu(configured: str | None = None) -> str:
    """The CRIU to use: *configured* (config ``criu_path``), else ``$XOS_CRIU``, else a
    system ``criu`` >= 4.0 on PATH, else the one scripts/install-criu.sh installed."""
    if configured or os.environ.get('XOS_CRIU'):
        path = configured or os.environ['XOS_CRIU']
        version, text = criu_version(path)
        if version < (4,):
            raise CriuError(f'{path} is CRIU {text}; xos-sshd needs 4.0 or newer')
        return path
    candidates = [shutil.which('criu') or '', '/usr/sbin/criu',
                  os.path.join(os.environ.get('XOS_CRIU_PREFIX', '/opt/xos-criu'), 'bin/criu')]
    seen = []
    for path in candidates:
        if not path or not os.path.exists(path):
            continue
        try:
            version, text = criu_version(path)
        except CriuError as exc:
            seen.append(f'{path}: {exc.reason}')
            continue
        if version >= (4,):
            return path
        seen.append(f'{path}: version {text} is older than 4.0')
    raise CriuError('no usable CRIU >= 4.0 found (run scripts/install-criu.sh, or set '
                    f'criu_path); looked at: {"; ".join(seen) or "criu on PATH, " + DEFAULT_PREFIX_CRIU}')


def as_user(account: LocalAccount, caps: Sequence[str], argv: Sequence[str]) -> list[str]:
    """``setpriv`` command line running *argv* as *account* with exactly *caps* ambient."""
    if account.uid == 0 or account.gid == 0:
        raise CriuError(f'refusing to run CRIU as uid {account.uid}/gid {account.gid}')
    cmd = [SETPRIV, f'--reuid={account.uid}', f'--regid={account.gid}']
    gids = sorted(set(account.gids))
    cmd += [f'--groups={",".join(map(str, gids))}'] if gids else ['--clear-groups']
    capset = ','.join(['-all'] + [f'+{c}' for c in caps])
    cmd += [f'--inh-caps={capset}', f'--ambient-caps={capset}', '--no-new-privs', '--', *argv]
    return cmd


def _helper_argv() -> list[str]:
    # By path with -S: the helper needs only the standard library (no site, no package).
    return [sys.executable, '-I', '-S',
            os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nsjob.py')]


async def run_helper(req: dict[str, Any], timeout: float,
                     pass_fds: Sequence[int] = ()) -> tuple[dict[str, Any], str]:
    """Run the namespace helper (as root) with one request; return (reply, its stderr).

    *pass_fds* are handed to the helper (and by it to CRIU) and closed here once it runs:
    the caller's copies would otherwise keep a socket open after CRIU is done with it.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *_helper_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=tuple(pass_fds), start_new_session=True,
            env=CRIU_ENV)
    finally:
        for fd in pass_fds:
            os.close(fd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(req).encode()), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CriuError(f'{req.get("op")} did not finish within {timeout:.0f} s') from None
    log = err.decode(errors='replace')
    try:
        reply = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CriuError(f'the namespace helper failed (exit status {proc.returncode}) '
                        'without a reply', log) from None
    return reply, log


async def _status_byte(fd: int) -> bool:
    """Whether the CRIU holding the write end of the pipe *fd* (its ``--status-fd``) wrote
    its readiness byte (``\\0``) before closing it (False: it ended or failed first).  Read
    in the event loop, no thread; *fd* is closed here."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not got.done():
            got.set_result(data)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        return await got == b'\0'
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _run(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                start_new_session=True, env=CRIU_ENV)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        os.killpg(proc.pid, 9)
        await proc.wait()
        raise CriuError(f'{" ".join(argv[-3:])} did not finish within {timeout:.0f} s') from None
    return proc.returncode or 0, out.decode(errors='replace'), err.decode(errors='replace')


async def probe(criu_path: str | None = None, account: LocalAccount | None = None,
                timeout: float = 60.0) -> CriuInfo:
    """Version, ``criu check`` and the migration features, as root or as *account*.

    Probing as an account (with the dump capabilities) tells what a job can really use:
    lazy pages need userfaultfd, which an unprivileged process gets only with
    ``vm.unprivileged_userfaultfd = 1``.  A failing ``criu check`` raises CriuError.
    """
    path = find_criu(criu_path)
    version, text = criu_version(path)

    def cmd(*args: str) -> list[str]:
        if account is None:
            return [path, *args]
        return as_user(account, CAPS_DUMP, [path, *args, '--unprivileged'])

    rc, out, err = await _run(cmd('check'), timeout)
    if rc != 0:
        raise CriuError(f'criu check failed (exit status {rc}): {_first_error(err) or "see log"}',
                        out + err)
    said = [ln for ln in (out + err).splitlines() if ln.strip() and 'Warn ' not in ln]
    # CRIU's verdict; an error line it prints after it (a missing /dev/net/tun, say) is not.
    check = next((ln for ln in said if 'Looks good' in ln), said[-1] if said else '')
    features = {'page_server': True}
    for name, feature in (('lazy_pages', 'uffd-noncoop'), ('soft_dirty', 'mem_dirty_track')):
        rc, _, _ = await _run(cmd('check', '--feature', feature), timeout)
        features[name] = rc == 0
    return CriuInfo(path, version, text, check, features, unprivileged=account is not None)


async def dump(pid: int, images_dir: str, account: LocalAccount, leave_running: bool, *,
               namespace: JobNamespace | None = None, criu_path: str | None = None,
               extra_args: Sequence[str] = (), timeout: float = 600.0,
               log_path: str | None = None, keep_stopped: bool = False,
               pass_fds: Sequence[int] = (),
               images_ready: Callable[[str], object] | None = None) -> DumpResult:
    """Checkpoint the process tree rooted at *pid* into *images_dir*, as *account*.

    With *namespace* (a job), *pid* is the root's pid inside the job's PID namespace and CRIU
    runs inside the job's namespaces; without it, *pid* is a host pid.  With
    *leave_running* the tree goes on after the dump.  Without, in a job namespace, the tree
    is left stopped and alive once the images are complete (``--leave-stopped``), as with
    *keep_stopped* (which says so whatever *leave_running* says: migration): the caller then
    ends it (:func:`kill_namespace`, once the images are safely kept) or lets it go on
    (:func:`thaw_namespace`); a host-pid tree is killed by CRIU.  *log_path*, if given,
    receives CRIU's whole log (written by root: give a root-owned location).

    *pass_fds* (job namespace only) reach CRIU as the same numbers (a ``--ps-socket``) and
    are closed here once CRIU runs.  *images_ready(images_dir)* is called when a
    ``--lazy-pages`` dump has written every image and starts serving pages (CRIU runs on
    until the pages are pulled).  CRIU says so itself, on a pipe given as ``--status-fd``
    (it writes one ``\\0`` there when its page server is ready, after every image file is
    flushed and closed): nothing the job controls can forge that, unlike a line of CRIU's log,
    which carries the job's file names and process names.
    """
    path = find_criu(criu_path)
    # In a job namespace CRIU itself is a member of it: if CRIU killed the tree, the job init
    # would exit and take CRIU down mid-way.  So the tree is left stopped (frozen: nothing it
    # does after the dump can happen), and the caller kills the namespace once the images are
    # kept -- or thaws it when they cannot be (a --stop checkpoint never loses the job).
    mode = (['--leave-stopped'] if keep_stopped
            else ['--leave-running'] if leave_running
            else ['--leave-stopped'] if namespace is not None else [])
    if namespace is None and (pass_fds or images_ready is not None):
        raise CriuError('pass_fds and images_ready need a job namespace')
    fds = list(pass_fds)
    status: asyncio.Task[bool] | None = None
    status_args: list[str] = []
    if images_ready is not None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        fds.append(status_w)
        status_args = ['--status-fd', str(status_w)]
        status = asyncio.ensure_future(_status_byte(status_r))

        def said_ready(task: asyncio.Task[bool]) -> None:
            if not task.cancelled() and task.exception() is None and task.result():
                images_ready(images_dir)
        status.add_done_callback(said_ready)
    args = [path, 'dump', '--unprivileged', '-t', str(pid), '-D', images_dir, '-v4',
            '--display-stats', *mode, *status_args, *extra_args]
    argv = as_user(account, CAPS_DUMP, args)
    started = time.monotonic()
    try:
        if namespace is None:
            rc, _out, log = await _run(argv, timeout)
            ok, error = rc == 0, f'exit status {rc}'
        else:
            reply, log = await run_helper(
                {'op': 'enter', 'target': namespace.init_pid, 'starttime': namespace.starttime,
                 'uid': account.uid, 'argv': argv, 'env': CRIU_ENV, 'fds': fds},
                timeout + 5, fds)
            ok, error = bool(reply.get('ok')), str(reply.get('error'))
        if status is not None:  # CRIU is gone, and with it the pipe's write end
            try:
                await asyncio.wait_for(asyncio.shield(status), 5)
            except TimeoutError:
                pass
    finally:
        if status is not None and not status.done():
            status.cancel()
    seconds = time.monotonic() - started
    _save_log(log_path, log)
    if not ok:
        raise CriuError(f'criu dump of pid {pid} as {account.name} failed ({error}): '
                        f'{_first_error(log) or error}', log)
    return DumpResult(seconds, log)


def namespace_members(ns: JobNamespace, uid: int) -> list[int]:
    """Host pids of the live processes of *uid* in the job's PID namespace (the init's),
    init first; empty when the init is not that job's any more."""
    try:
        with open(f'/proc/{ns.init_pid}/stat') as f:
            stat = f.read()
        if int(stat[stat.rindex(')') + 2:].split()[19]) != ns.starttime:
            return []
        pidns = os.stat(f'/proc/{ns.init_pid}/ns/pid').st_ino
    except (OSError, ValueError, IndexError):
        return []
    members = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f'/proc/{entry}/ns/pid').st_ino == pidns \
                    and os.stat(f'/proc/{entry}').st_uid == uid:
                members.append(int(entry))
        except OSError:
            continue
    return sorted(members, key=lambda p: p != ns.init_pid)


def thaw_namespace(ns: JobNamespace, uid: int) -> int:
    """SIGCONT every process of a job left stopped by a dump (a migration or a ``--stop``
    checkpoint that did not happen: the job goes on where it stood).  Each process is pinned
    with a pidfd and re-checked before the signal; returns how many were continued."""
    done = 0
    for pid in namespace_members(ns, uid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if os.stat(f'/proc/{pid}').st_uid == uid:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
                done += 1
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return done


def kill_namespace(ns: JobNamespace, uid: int) -> bool:
    """SIGKILL a job's init (the kernel then kills its whole PID namespace), through a pidfd
    checked against the init's start time and uid.  False if it was already gone."""
    try:
        pidfd = os.pidfd_open(ns.init_pid)
    except ProcessLookupError:
        return False
    try:
        with open(f'/proc/{ns.init_pid}/stat') as f:
            stat = f.read()
        if int(stat[stat.rindex(')') + 2:].split()[19]) != ns.starttime \
                or os.stat(f'/proc/{ns.init_pid}').st_uid != uid:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


async def restore(images_dir: str, account: LocalAccount, *, job_id: str, job_dir: str,
                  criu_path: str | None = None, init_python: str = DEFAULT_INIT_PYTHON,
                  extra_args: Sequence[str] = (), timeout: float = 600.0,
                  log_path: str | None = None) -> RestoreResult:
    """Restore the images in *images_dir* as *account* into a fresh job namespace.

    The restored tree gets its original pids inside a new PID namespace, so it never clashes
    with the original job, running or not.  Its pid 1 becomes a job init (job id *job_id*,
    exit status recorded in *job_dir*, created by the account).  The files the job had open
    must exist at the same paths.  Returns the new init's host pid.
    """
    path = find_criu(criu_path)
    args = [path, 'restore', '--unprivileged', '-D', images_dir, '-v4', '--display-stats',
            '--restore-detached', '--leave-stopped', *extra_args]
    req = {'op': 'restore', 'job_id': job_id, 'uid': account.uid, 'gid': account.gid,
           'groups': sorted(set(account.gids)), 'home': account.home, 'job_dir': job_dir,
           'python': init_python, 'argv_criu': as_user(account, CAPS_RESTORE, args),
           'env_criu': CRIU_ENV, 'env': {'PATH': CRIU_ENV['PATH']}, 'timeout': timeout}
    started = time.monotonic()
    reply, log = await run_helper(req, timeout + 40)
    seconds = time.monotonic() - started
    _save_log(log_path, log)
    if not reply.get('ok'):
        raise CriuError(f'criu restore from {images_dir} as {account.name} failed: '
                        f'{reply.get("error")}' + (f': {_first_error(log)}' if _first_error(log) else ''),
                        log)
    return RestoreResult(int(reply['pid']), int(reply['root']), int(reply['starttime']),
                         seconds, log)


class CriuDaemon:
    """A CRIU page server or lazy-pages daemon running as an account on one socket (see
    :func:`start_page_server`, :func:`start_lazy_pages`); its log (stderr) is collected."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc = proc
        self.what = what
        assert proc.stderr is not None
        self._log = asyncio.ensure_future(proc.stderr.read())

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def finish(self, timeout: float) -> str:
        """Wait for the daemon to end; its log, or CriuError (non-zero exit, or still running
        after *timeout* s: then it is killed)."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
            log = (await self._log).decode(errors='replace')
            raise CriuError(f'{self.what} did not finish within {timeout:.0f} s', log) from None
        log = (await self._log).decode(errors='replace')
        if self.proc.returncode != 0:
            raise CriuError(f'{self.what} failed (exit status {self.proc.returncode}): '
                            f'{_first_error(log) or "see log"}', log)
        return log

    def kill(self) -> None:
        """SIGKILL the daemon's process group (it runs as the account, in its own session)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


async def _spawn_daemon(argv: Sequence[str], what: str, pass_fds: Sequence[int]) -> CriuDaemon:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds), start_new_session=True, env=CRIU_ENV, cwd='/')
    finally:
        for fd in pass_fds:
            os.close(fd)
    return CriuDaemon(proc, what)


async def start_page_server(images_dir: str, account: LocalAccount, sock_fd: int, *,
                            criu_path: str | None = None) -> CriuDaemon:
    """``criu page-server --ps-socket`` as *account*: writes the pages a ``dump
    --page-server`` sends over *sock_fd* (a connected socket, closed here once passed) into
    *images_dir* (a directory the account owns), and ends when the dump says it is done.
    No port is ever opened.

    What it reads comes from the network (relayed by the user), so it gets no capability on
    the host at all: ``--unprivileged`` would need ``CAP_CHECKPOINT_RESTORE``, so instead it
    runs as root of a user namespace of its own (:func:`own_userns`), the account's uid
    everywhere else.  Its files belong to the account."""
    path = find_criu(criu_path)
    argv = own_userns(account, [path, 'page-server', '--ps-socket', str(sock_fd), '-D',
                                images_dir, '-v4'])
    return await _spawn_daemon(argv, f'criu page-server as {account.name}', (sock_fd,))


def own_userns(account: LocalAccount, argv: Sequence[str]) -> list[str]:
    """*argv* as *account* with no capability, inside a new user namespace (where the account
    is root: CRIU then runs without ``--unprivileged``) and a mount namespace of that
    namespace's own (CRIU's kernel probes mount a tmpfs).  Host privileges: none."""
    return as_user(account, (), [UNSHARE, '--user', '--map-root-user', '--mount', *argv])


async def start_lazy_pages(images_dir: str, work_dir: str, account: LocalAccount,
                           sock_fd: int, *, criu_path: str | None = None,
                           timeout: float = 30.0) -> CriuDaemon:
    """``criu lazy-pages --page-server --ps-socket`` as *account*, ready to serve a
    ``restore --lazy-pages --work-dir WORK_DIR``: it takes the restored processes'
    userfaultfds over ``WORK_DIR/lazy-pages.socket`` and fills their memory with pages it
    asks for over *sock_fd* (from the source's ``dump --lazy-pages``).  Returns once it
    listens (``--status-fd``).

    CRIU 4.1.1 never uses userfaultfd in ``--unprivileged`` mode (kerndat skips it, and
    ``lazy-pages`` then exits 1 without a word), and refuses to run as non-root without it.
    So the daemon runs as the account inside a user namespace of its own
    (:func:`own_userns`): root there, the account everywhere else, no capability on the
    host.  The kernel must let the account open a userfaultfd
    (``vm.unprivileged_userfaultfd = 1``) and create user namespaces.
    """
    path = find_criu(criu_path)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        argv = own_userns(account, [path, 'lazy-pages', '--page-server', '--ps-socket',
                                    str(sock_fd), '--status-fd', str(status_w), '-D',
                                    images_dir, '--work-dir', work_dir, '-v4'])
        daemon = await _spawn_daemon(argv, f'criu lazy-pages as {account.name}',
                                     (sock_fd, status_w))
        try:
            said = await asyncio.wait_for(asyncio.to_thread(os.read, status_r, 1), timeout)
        except TimeoutError:
            said = b''
    finally:
        os.close(status_r)
    if not said:  # it exited (or hung) before listening
        daemon.kill()
        await daemon.finish(5)
        raise CriuError(f'{daemon.what} did not start')
    return daemon


def _save_log(log_path: str | None, log: str) -> None:
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(log)
