"""The exec shim's launcher: the part of :mod:`.spawn` the per-session PAM helper runs too.

:func:`popen_as` starts ``xos-session-exec`` (``native/xos_session_exec.c``) as root, which
drops to the account and execs the session's program; :mod:`.spawn` says why it is done so.
This module is imported by the PAM helper at every PAM session start, a fresh interpreter
(``python -I -S``), so it imports only what that helper needs anyway (``os``, ``resource``,
``stat``, ``subprocess``): no logging, typing, dataclasses or pathlib.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess

#: typing.TYPE_CHECKING without importing typing (type checkers read it as True).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Mapping, Sequence

#: A limit ready for setrlimit: (resource number, soft, hard); RLIM_INFINITY as Python has it.
RLimit = tuple[int, int, int]


class SpawnError(Exception):
    """The user's process could not be started; the message says why."""


class Stdio:
    """The three file descriptors the child gets (a pty slave, or pipe ends)."""

    __slots__ = ('stdin', 'stdout', 'stderr')

    def __init__(self, stdin: int | IO[bytes], stdout: int | IO[bytes],
                 stderr: int | IO[bytes]) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr


def apply_rlimits(limits: Sequence[Sequence[int]]) -> None:
    """setrlimit each ``(resource, soft, hard)`` on this process (children inherit them)."""
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, hard))


# --- the exec shim ---------------------------------------------------------------------------

#: Where ``make -C native install`` puts the shim.
DEFAULT_EXEC_HELPER = '/usr/libexec/xos-sshd/xos-session-exec'
#: The directory that holds the ``xos_sshd`` package (a source checkout's root in dev).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
#: Where ``make -C native`` builds the shim in a source checkout (next to the package).
DEV_EXEC_HELPER = os.path.join(PACKAGE_PARENT, 'native', 'build', 'xos-session-exec')


def exec_helper(configured: str | os.PathLike[str] | None = None) -> str:
    """The exec shim to run: *configured* (``[session] exec_helper``) when given, else the
    installed one, else the source checkout's build; raises :class:`SpawnError` saying how
    to get one when there is none, or when the one found is not safe to run as root."""
    candidates = ([os.fspath(configured)] if configured is not None
                  else [DEFAULT_EXEC_HELPER, DEV_EXEC_HELPER])
    for path in candidates:
        if os.path.lexists(path):
            problem = unsafe_program(path)
            if problem:
                raise SpawnError(f'session exec helper {problem}')
            return path
    where = ' or '.join(candidates)
    raise SpawnError(f'session exec helper not found ({where}): run make -C native install, '
                     'or set [session] exec_helper')


def unsafe_path(path: str) -> str | None:
    """Why *path* is not safe for root to use (a program it runs, a PAM service file, or
    their directory): not root-owned, writable by others, a symlink, missing; None when it
    is fine."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f'{path}: {exc.strerror}'
    if stat.S_ISLNK(st.st_mode):
        return f'{path} is a symlink'
    if st.st_uid != 0 or st.st_mode & 0o022:
        return (f'{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} '
                '(must be root-owned, not group/world-writable)')
    return None


def unsafe_program(path: str) -> str | None:
    """Why *path* may not be run as root (:func:`unsafe_path` of it and of its directory, or
    not an executable file); None when it is fine."""
    problem = unsafe_path(path) or unsafe_path(os.path.dirname(path) or '.')
    if problem is not None:
        return problem
    mode = os.lstat(path).st_mode
    if not (stat.S_ISREG(mode) and mode & 0o100):
        return f'{path} is not an executable file'
    return None


def limit_text(limit: int) -> str:
    """A resource limit as limits.conf and the shim write it."""
    return 'unlimited' if limit == resource.RLIM_INFINITY else str(limit)


def _environment_fd(env: Mapping[str, str]) -> int:
    """A memfd holding *env* as the shim reads it (``NAME=VALUE`` entries, NUL-ended), at
    offset 0; raises ValueError for a name or value the kernel could not carry."""
    block = bytearray()
    for name, value in env.items():
        entry = f'{name}={value}'.encode()
        if not name or '=' in name or b'\0' in entry:
            raise ValueError(f'bad environment variable {name[:64]!r}')
        block += entry + b'\0'
    fd = os.memfd_create('xos-session-env', os.MFD_CLOEXEC)
    try:
        os.write(fd, block)  # a memfd takes it all at once
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def shim_argv(helper: str, uid: int, gid: int, groups: Sequence[int], home: str,
              argv: Sequence[str], env_fd: int, *, executable: str, take_tty: bool,
              rlimits: Sequence[Sequence[int]], parent: int | None) -> list[str]:
    """The shim's command line for one session process (usage: native/xos_session_exec.c)."""
    cmd = [helper, '--uid', str(uid), '--gid', str(gid),
           '--groups', ','.join(str(g) for g in groups), '--home', home,
           '--env-fd', str(env_fd)]
    for res, soft, hard in rlimits:
        cmd += ['--rlimit', f'{res}:{limit_text(soft)}:{limit_text(hard)}']
    if take_tty:
        cmd.append('--tty')
    if parent is not None:
        cmd += ['--parent', str(parent)]
    return cmd + ['--', executable, *argv]


def popen_as(uid: int, gid: int, groups: Sequence[int], home: str, argv: Sequence[str],
             env: Mapping[str, str], stdio: Stdio, *, executable: str, take_tty: bool = False,
             rlimits: Sequence[Sequence[int]] = (), die_with_parent: bool = False,
             helper: str | None = None) -> subprocess.Popen[bytes]:
    """The one way a process is started as an account (the gateway's sessions and the PAM
    helper's user process): *argv* runs with exactly *uid*, *gid* and *groups*, as a session
    leader, no_new_privs set, an empty signal mask, *rlimits*, and only *env* in its
    environment, through the exec shim *helper* (:func:`exec_helper` when None).  Returns
    once the shim runs (as root): the drop, the tty, the home and the exec happen after.
    *die_with_parent*: SIGKILL it when this process dies (the PAM helper, which cannot
    forward a SIGKILL it gets itself)."""
    if uid == 0 or gid == 0:
        raise SpawnError(f'refusing to start a process as uid {uid}/gid {gid}')
    helper = helper or exec_helper()
    env_fd = _environment_fd(env)
    try:
        cmd = shim_argv(helper, uid, gid, groups, home, argv, env_fd, executable=executable,
                        take_tty=take_tty, rlimits=rlimits,
                        parent=os.getpid() if die_with_parent else None)
        # No preexec_fn, user, group or extra_groups: CPython then vforks, and nothing but
        # dup2/setsid/close runs between the fork and the shim's exec, as root.
        return subprocess.Popen(cmd, executable=helper, env={}, stdin=stdio.stdin,
                                stdout=stdio.stdout, stderr=stdio.stderr,
                                start_new_session=True, close_fds=True, pass_fds=(env_fd,))
    finally:
        os.close(env_fd)
