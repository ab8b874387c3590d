"""Root-side namespace helper for jobs: start a job, restore one, run a command inside one.

Run as ``python -I -S .../xos_sshd/cr/nsjob.py`` (as root) by :mod:`xos_sshd.cr.criu` and
:mod:`xos_sshd.cr.jobs`, with one JSON request on stdin; it answers with one JSON line on
stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``) and exits.  Whatever CRIU
logs goes to this helper's stderr, which the caller captures.

Why a separate process: the gateway is a threaded asyncio program, where fork + Python in the
child is unsafe and ``setns(CLONE_NEWNS)`` is refused; and namespace creation must happen as
root *before* the drop to the account.  Why not ``unshare --fork``: it stays behind as a
root parent waiting for the job, which a restored job would never have.  Only stdlib and
ctypes are used, nothing of the gateway is imported.

The shape of a job (measured on kernel 6.18 with CRIU 4.1.1, see issue 4):

* a new PID namespace + its own mount namespace (all mounts made ``MS_SLAVE`` first: mounts
  the host makes later, an automounted home say, still appear inside, and nothing propagates
  back out) with its own ``/proc``: an unprivileged CRIU refuses a task whose
  ``/proc`` belongs to another PID namespace;
* pid 1 is :mod:`xos_sshd.cr.jobinit` (forwards signals, reaps); the user's command is pid 2,
  leading its own session.  CRIU dumps **the tree under pid 2**, never the init;
* CRIU runs *inside* the job's PID and mount namespaces (op ``enter``), so it sees them as its
  own and dumps neither: the unprivileged CRIU could not dump a mount namespace here
  (``Can't setns .../mnt``) nor create one on restore.  Restore (op ``restore``) makes fresh
  namespaces, runs CRIU in them as the job's pid 1's child, then turns pid 1 into the job
  init adopting the restored tree: pids are the image's own, so a restore never clashes
  with the original (still running or not);
* every descriptor of the job is opened inside its mount namespace (CRIU cannot dump others):
  0/1/2 become ``/dev/null`` at once and every other inherited descriptor is closed.

Security: every process that runs user code or CRIU has exactly the account's uid, gid and
groups.  The job init has no capability at all and ``no_new_privs``.  CRIU gets only the
ambient capabilities the caller put in its ``setpriv`` command line.  After a restore, before
anything restored runs (CRIU leaves it stopped), every process of the namespace is checked:
the account's uids, gids and groups, an empty capability set, ``no_new_privs``; anything else
(an image forged to keep CRIU's capabilities, say) is killed and reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC = 0x4000
MS_SLAVE = 1 << 19
PR_SET_NO_NEW_PRIVS = 38
_CAP_V3 = 0x20080522
SYS_PIDFD_OPEN = 434

#: How long the init may take to create the job directory and start the command.
READY_TIMEOUT = 30.0

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32),
                ('inheritable', ctypes.c_uint32)]


class HelperError(Exception):
    """Reported to the caller as ``{"ok": false, "error": str(exc)}``."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise HelperError(f'{what}: {os.strerror(err)}')


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags), None),
           f'mount {target}')


def proc_status(pid: int | str) -> dict[str, str]:
    """``/proc/PID/status`` as a dict of stripped strings."""
    with open(f'/proc/{pid}/status') as f:
        return {k: v.strip() for k, v in (line.split(':', 1) for line in f if ':' in line)}


def start_time(pid: int, proc_fd: int | None = None) -> int:
    """The process's start time (clock ticks after boot): with the pid, a unique identity."""
    fd = os.open(f'{pid}/stat' if proc_fd is not None else f'/proc/{pid}/stat', os.O_RDONLY,
                 dir_fd=proc_fd)
    with os.fdopen(fd) as f:
        stat = f.read()
    return int(stat[stat.rindex(')') + 2:].split()[19])


def _creds_problem(status: dict[str, str], req: dict[str, Any]) -> str | None:
    """Why a process's credentials are not exactly the account's (None when they are)."""
    uid, gid = str(req['uid']), str(req['gid'])
    if status['Uid'].split() != [uid] * 4:
        return f'uids {status["Uid"]} (expected {uid})'
    if status['Gid'].split() != [gid] * 4:
        return f'gids {status["Gid"]} (expected {gid})'
    if sorted(int(g) for g in status.get('Groups', '').split()) != sorted(req['groups']):
        return f'groups {status.get("Groups", "")!r} (expected {sorted(req["groups"])})'
    for key in ('CapInh', 'CapPrm', 'CapEff', 'CapAmb'):
        if int(status.get(key, '0'), 16) != 0:
            return f'{key} {status[key]} (expected none)'
    if status.get('NoNewPrivs') != '1':
        return 'no_new_privs is not set'
    return None


def _drop(req: dict[str, Any]) -> None:
    """Become the account for good: no capabilities left, no_new_privs set; verified."""
    if req['uid'] == 0 or req['gid'] == 0:
        raise HelperError(f'refusing to run a job as uid {req["uid"]}/gid {req["gid"]}')
    os.setgroups(req['groups'])
    os.setresgid(req['gid'], req['gid'], req['gid'])
    os.setresuid(req['uid'], req['uid'], req['uid'])  # clears permitted/effective/ambient
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 'prctl(PR_SET_NO_NEW_PRIVS)')
    hdr, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), data), 'capset')  # and the inheritable set
    problem = _creds_problem(proc_status('self'), req)
    if problem:
        raise HelperError(f'dropping privileges failed: {problem}')


def _close_fds_except(keep: set[int]) -> None:
    for fd in [int(n) for n in os.listdir('/proc/self/fd')]:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _stdio_null() -> None:
    null = os.open('/dev/null', os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _set_rlimits(limits: Any) -> None:
    """The ``[session] rlimits`` (``[resource, soft, hard]``, already fitted to what the
    gateway can grant), set as root before the drop: the init and the command inherit them."""
    for res, soft, hard in limits:
        try:
            resource.setrlimit(int(res), (int(soft), int(hard)))
        except (OSError, ValueError) as exc:
            raise HelperError(f'setrlimit({res}, {soft}, {hard}): {exc}') from None


def _exec_init(req: dict[str, Any], init_fd: int, status_w: int, adopt: int | None) -> None:
    """Drop to the account and exec the job init (see jobinit.py) from descriptor init_fd."""
    _set_rlimits(req.get('rlimits', ()))
    _drop(req)
    os.set_inheritable(init_fd, True)
    os.set_inheritable(status_w, True)
    argv = [req['python'], '-I', '-S', f'/proc/self/fd/{init_fd}',
            '--status-fd', str(status_w), '--close-fd', str(init_fd),
            '--job-id', req['job_id'], '--job-dir', req['job_dir'], '--cwd', req['home']]
    if adopt is not None:
        argv += ['--adopt', str(adopt)]
    os.execve(req['python'], argv + ['--', *req.get('argv', [])], req.get('env', {}))


def _restore_in_ns(req: dict[str, Any], init_fd: int, status_w: int) -> None:
    """pid 1 of a fresh namespace: run CRIU restore, vet what it made, become its init."""
    # CRIU and its helpers must not take a pid the image needs: a job's pids are small
    # (its namespace started empty), so CRIU is made to run just below pid_max.
    with open('/proc/sys/kernel/pid_max') as f:
        pid_max = int(f.read())
    with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
        f.write(str(req.get('last_pid') or max(pid_max - 64, 300)))
    criu = os.fork()
    if criu == 0:
        try:
            os.dup2(2, 1)  # stdout is the caller's JSON channel
            for fd in req.get('fds', []):
                os.set_inheritable(fd, True)
            os.execve(req['argv_criu'][0], req['argv_criu'], req.get('env_criu', {}))
        finally:
            os._exit(127)
    _, status = os.waitpid(criu, 0)
    if status != 0:
        code = os.waitstatus_to_exitcode(status)
        raise HelperError(f'criu restore failed (exit status {code})')
    tasks = [int(p) for p in os.listdir('/proc') if p.isdigit() and p != '1']
    roots = []
    for pid in tasks:
        # Credentials are per thread: check every thread.  Zombies (CRIU re-creates the
        # job's unreaped children as such) run nothing and keep CRIU's inherited sets.
        try:
            tids = os.listdir(f'/proc/{pid}/task')
            leader = proc_status(pid)
        except FileNotFoundError:
            continue
        if leader.get('State', '').startswith(('Z', 'X')):
            continue
        for tid in tids:
            try:
                status_ = proc_status(f'{pid}/task/{tid}')
            except FileNotFoundError:
                continue
            problem = _creds_problem(status_, req)
            if problem:
                os.kill(-1, signal.SIGKILL)
                raise HelperError(f'restored process {pid} ({status_.get("Name")}) thread {tid} '
                                  f'has {problem}: refusing to run it')
        if leader['PPid'] == '1':
            roots.append(pid)
    if len(roots) != 1:
        os.kill(-1, signal.SIGKILL)
        raise HelperError(f'expected one restored tree, found roots {roots}')
    for pid in tasks:  # CRIU left them stopped (--leave-stopped): now they may run
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    _stdio_null()
    _close_fds_except({init_fd, status_w})
    _exec_init(req, init_fd, status_w, adopt=roots[0])


def _ns_pid1(req: dict[str, Any], init_fd: int, status_w: int) -> None:
    """The forked child: pid 1 of the new PID namespace (still root)."""
    os.setsid()
    _mount('proc', '/proc', 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if req['op'] == 'start':
        _stdio_null()  # opened inside the new mount namespace
        _close_fds_except({init_fd, status_w})
        _exec_init(req, init_fd, status_w, adopt=None)
    else:
        # CRIU's log still goes to the caller's stderr; stdin is /dev/null.
        null = os.open('/dev/null', os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _close_fds_except({init_fd, status_w, *req.get('fds', [])})
        _restore_in_ns(req, init_fd, status_w)


def new_job(req: dict[str, Any]) -> dict[str, Any]:
    """Ops ``start`` and ``restore``: new namespaces, pid 1 forked, wait for ``ok``."""
    # The init's source is opened here, by root, from the installed package (never a user
    # path) and handed over as a descriptor: the account need not be able to read the
    # gateway's installation directory.
    init_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'jobinit.py')
    init_fd = os.open(init_path, os.O_RDONLY | os.O_CLOEXEC)
    # The host's /proc, held open: pid 1 mounts the new namespace's /proc over it in the
    # mount namespace this process shares with it.
    proc_fd = os.open('/proc', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS), 'unshare(CLONE_NEWPID|CLONE_NEWNS)')
    _mount(None, '/', None, MS_REC | MS_SLAVE)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_r)
            os.close(proc_fd)
            _ns_pid1(req, init_fd, status_w)
            raise HelperError('the job init did not start')
        except BaseException as exc:  # noqa: BLE001 (report; never return into the parent's code)
            try:
                os.write(status_w, f'error {exc}\n'.encode())
            finally:
                os._exit(127)
    os.close(status_w)
    os.close(init_fd)
    for fd in req.get('fds', []):
        os.close(fd)
    line = _read_line(status_r, READY_TIMEOUT + float(req.get('timeout', 0)))
    if line.startswith('ok '):
        return {'ok': True, 'pid': pid, 'root': int(line.split()[1]), 'starttime': start_time(pid, proc_fd)}
    try:  # the namespace failed: end it and collect its pid 1 (we are still its parent)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
    if line.startswith('error '):
        raise HelperError(line[len('error '):])
    raise HelperError(line or 'the job init exited before reporting ready (can the account '
                      f'run {req["python"]}?)')


def _read_line(fd: int, timeout: float) -> str:
    buf = b''
    deadline = time.monotonic() + timeout
    while b'\n' not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return f'timed out after {timeout:.0f} s'
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors='replace').strip()


def enter(req: dict[str, Any]) -> dict[str, Any]:
    """Op ``enter``: run ``argv`` inside the PID and mount namespaces of job init ``target``.

    The target is held by a pidfd and re-checked (uid, start time) after opening it, so a
    recycled pid can never send us into another process's namespaces.
    """
    target = int(req['target'])
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, target, 0)
    if pidfd < 0:
        raise HelperError(f'job process {target} is gone')
    try:
        status = proc_status(target)
        if status['Uid'].split()[0] != str(req['uid']) or start_time(target) != req['starttime']:
            raise HelperError(f'process {target} is no longer the job init')
        _check(_libc.setns(pidfd, CLONE_NEWPID | CLONE_NEWNS), f'setns into job {target}')
    finally:
        os.close(pidfd)
    child = os.fork()  # the child is inside the job's PID namespace
    if child == 0:
        try:
            os.dup2(2, 1)
            for fd in req.get('fds', []):
                os.set_inheritable(fd, True)
            os.execve(req['argv'][0], req['argv'], req.get('env', {}))
        finally:
            os._exit(127)
    for fd in req.get('fds', []):
        os.close(fd)
    _, wstatus = os.waitpid(child, 0)
    return {'ok': wstatus == 0, 'status': os.waitstatus_to_exitcode(wstatus),
            'error': '' if wstatus == 0 else f'exit status {os.waitstatus_to_exitcode(wstatus)}'}


def main() -> None:
    try:
        req = json.load(sys.stdin)
        if req.get('op') in ('start', 'restore'):
            result = new_job(req)
        elif req.get('op') == 'enter':
            result = enter(req)
        else:
            raise HelperError(f'unknown op {req.get("op")!r}')
    except Exception as exc:  # noqa: BLE001 (one JSON line whatever happens)
        result = {'ok': False, 'error': str(exc) if isinstance(exc, HelperError) else f'{type(exc).__name__}: {exc}'}
    sys.stdout.write(json.dumps(result) + '\n')
    sys.stdout.flush()
    os._exit(0 if result.get('ok') else 1)


if __name__ == '__main__':
    main()
