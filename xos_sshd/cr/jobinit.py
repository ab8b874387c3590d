"""The init (pid 1) of a job's PID namespace, running as the job's account.

Started by :mod:`xos_sshd.cr.nsjob` as ``python3 -I -S /proc/self/fd/N ...`` after the drop
to the account (no capabilities, no_new_privs).  Standard library only, no ``site``: it must
start fast, stay small (its memory is part of every checkpoint image) and run with the
system's ``python3``, which every account can execute (the gateway's own interpreter may live
where accounts cannot read; its source arrives as descriptor N, closed here at once).

What it does, in order:

1. creates the job directory (``~/.xos-jobs/<job-id>/``, mode 0700) *as the account*, so root
   never follows a path the user controls;
2. opens ``stdout`` and ``stderr`` there (append mode) and ``/dev/null`` for stdin, inside the
   job's mount namespace (CRIU can dump only descriptors opened there);
3. forks the command in its own process group, cwd = the home directory, and reports
   ``ok <pid>`` (or ``error <reason>``, e.g. the command cannot be executed) on the status
   descriptor, then closes it: after that the job holds nothing shared with the gateway;
4. forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the command's process
   group (a PID namespace's init ignores signals it has no handler for, so without this
   ``kill JOB`` would do nothing), and reaps every orphan of the namespace;
5. with ``--adopt PID`` (after a CRIU restore) steps 1-3 are replaced by adopting the restored
   tree rooted at PID, which CRIU's exit re-parented to this pid 1;
6. when the command ends, writes ``exit-status`` (JSON; informational, the user can write
   it too) and exits with the command's status (128 + signal when it was killed), which
   ends the namespace and everything left in it.

The init itself is never checkpointed: CRIU dumps the tree under the command (pid 2), and
a restore starts a fresh init that adopts the restored tree.  So a Python init costs no dump
or restore time, only its ~9 MiB of resident memory per job and ~20 ms at start.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import sys
from types import FrameType

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


class _KernelSigaction(ctypes.Structure):
    """``struct sigaction`` as the x86-64 ``rt_sigaction`` system call takes it."""

    _fields_ = [('handler', ctypes.c_void_p), ('flags', ctypes.c_ulong),
                ('restorer', ctypes.c_void_p), ('mask', ctypes.c_uint64)]


def reset_signals() -> None:
    """Every signal to its default action and an empty mask, for the command about to exec.

    exec keeps ignored signals ignored and the mask as it is.  Python's own ignores
    (SIGPIPE, SIGXFSZ) are undone by ``signal.signal``, but glibc refuses to touch its
    reserved real-time signals 32 and 33 through sigaction/sigprocmask, so a parent that
    left one of those ignored or blocked would leak it into every job: on x86-64 the
    system calls are made directly.
    """
    for sig in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if platform.machine() != 'x86_64':
        return
    libc = ctypes.CDLL(None, use_errno=True)
    sys_rt_sigaction, sys_rt_sigprocmask, sig_setmask = 13, 14, 2
    default = _KernelSigaction(0, 0, None, 0)
    for sig in range(1, 65):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            libc.syscall(sys_rt_sigaction, sig, ctypes.byref(default), None, 8)
    empty = ctypes.c_uint64(0)
    libc.syscall(sys_rt_sigprocmask, sig_setmask, ctypes.byref(empty), None, 8)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--status-fd N --close-fd N --job-id ID --job-dir D --cwd D [--adopt PID] -- CMD...``"""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != '--':
        opts[argv[i].lstrip('-')] = argv[i + 1]
        i += 2
    return opts, argv[i + 1:]


def open_stdio(job_dir: str) -> None:
    """Make the job directory and point 0/1/2 at /dev/null and the two log files."""
    os.umask(0o077)
    os.makedirs(job_dir, 0o700, exist_ok=True)
    fds = [os.open('/dev/null', os.O_RDONLY),
           os.open(os.path.join(job_dir, 'stdout'), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
           os.open(os.path.join(job_dir, 'stderr'), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)]
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)


def start(argv: list[str], cwd: str) -> int:
    """Fork and exec the command; return its pid, or raise OSError with the exec error."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            os.setsid()  # CRIU wants the dumped root to lead its own session
            reset_signals()  # defaults and an empty mask, whatever the parents left
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir('/')
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(err_w, f'cannot execute {argv[0]}: {exc.strerror}'.encode())
        finally:
            os._exit(127)
    os.close(err_w)
    msg = b''
    while True:
        chunk = os.read(err_r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(err_r)
    if msg:
        os.waitpid(pid, 0)
        raise OSError(0, msg.decode(errors='replace'))
    return pid


def write_exit_status(job_dir: str, status: int) -> int:
    """Record how the command ended (temp file + rename: never a torn file)."""
    if os.WIFSIGNALED(status):
        info: dict[str, int] = {'signal': os.WTERMSIG(status), 'code': 128 + os.WTERMSIG(status)}
    else:
        info = {'code': os.WEXITSTATUS(status)}
    try:
        tmp = os.path.join(job_dir, '.exit-status.tmp')
        with open(tmp, 'w') as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(job_dir, 'exit-status'))
    except OSError:
        pass
    return info['code']


def main() -> None:
    opts, argv = parse(sys.argv[1:])
    os.close(int(opts['close-fd']))
    status_fd = int(opts['status-fd'])
    os.set_inheritable(status_fd, False)  # the command must not inherit the gateway's pipe
    job_dir = opts['job-dir']
    try:
        if 'adopt' in opts:
            # After a restore: the restored tree (re-parented to us) is the job.
            os.umask(0o077)
            os.makedirs(job_dir, 0o700, exist_ok=True)
            child = int(opts['adopt'])
        else:
            if not argv:
                raise OSError(0, 'no command given')
            open_stdio(job_dir)
            child = start(argv, opts['cwd'])
    except OSError as exc:
        reason = exc.strerror if not exc.filename else f'{exc.filename}: {exc.strerror}'
        os.write(status_fd, f'error {reason or exc}\n'.encode())
        os._exit(127)

    def forward(signum: int, _frame: FrameType | None) -> None:
        try:
            os.killpg(child, signum)
        except OSError:
            try:
                os.kill(child, signum)
            except OSError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    os.write(status_fd, f'ok {child}\n'.encode())
    os.close(status_fd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            os._exit(write_exit_status(job_dir, status))


if __name__ == '__main__':
    main()
