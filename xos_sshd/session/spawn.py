"""Start a process as a mapped account: the only place where the gateway drops to a user.

``subprocess.Popen`` forks and makes the child a session leader (``setsid``); the preexec
step below then runs in the child, still as root: it sets the session's resource limits
(``[session] rlimits``: only root may raise a hard limit), ``setgroups``, ``setresgid`` and
``setresuid`` (all three uids, so the child can never get root back), and only *then*, with
the user's credentials, sets no_new_privs, takes the controlling tty and changes into the
home directory: the root process never opens a user-controlled path.

With ``[session] pam = true`` the child is not the user's process but a root helper
(:mod:`.pamsession`) that opens the PAM session and starts the user's process through the
very same :func:`popen_as`.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import logging
import os
import resource
import signal
import subprocess
import termios
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Mapping, Sequence

from .libc import set_no_new_privs

if TYPE_CHECKING:
    from ..ams import LocalAccount
    from ..config import SessionConfig

log = logging.getLogger(__name__)

#: A limit ready for setrlimit: (resource number, soft, hard); RLIM_INFINITY as Python has it.
RLimit = tuple[int, int, int]

#: The capability that lets root raise a hard limit above its own (capabilities(7)).
_CAP_SYS_RESOURCE = 24
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_warned: set[str] = set()


class SpawnError(Exception):
    """The user's process could not be started; the message says why."""


@dataclass(frozen=True)
class Stdio:
    """The three file descriptors the child gets (a pty slave, or pipe ends)."""

    stdin: int | IO[bytes]
    stdout: int | IO[bytes]
    stderr: int | IO[bytes]


# --- resource limits ------------------------------------------------------------------------


def _value(limit: int) -> float:
    return float('inf') if limit == resource.RLIM_INFINITY else float(limit)


@functools.cache
def _can_raise_hard_limits() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (containers often drop it)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('CapEff:'):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return False


@functools.cache
def _nr_open() -> int:
    try:
        with open('/proc/sys/fs/nr_open') as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def child_rlimits(configured: Sequence[tuple[str, int, int]]) -> list[RLimit]:
    """The configured ``(name, soft, hard)`` limits as children of this process can get them.

    A hard limit above this process's own needs CAP_SYS_RESOURCE (and ``nofile`` can never
    exceed ``fs.nr_open``); without it the hard limit is clamped to this process's, the soft
    limit to the hard one, and a warning is logged once per name.  Clamping only ever makes
    a limit stricter, and it keeps the default (nofile 1024/524288) from failing every login
    in a container that caps the gateway lower.
    """
    out: list[RLimit] = []
    can_raise: bool | None = None
    for name, soft, hard in configured:
        res = getattr(resource, 'RLIMIT_' + name.upper())
        if name == 'nofile':
            top = _nr_open()
            hard = top if _value(hard) > top else hard
            soft = top if _value(soft) > top else soft
        own_hard = resource.getrlimit(res)[1]
        if _value(hard) > _value(own_hard):
            if can_raise is None:
                can_raise = _can_raise_hard_limits()
            if not can_raise:
                if name not in _warned:
                    _warned.add(name)
                    log.warning('session.rlimits.%s: hard limit %s is above the gateway\'s own '
                                '(%s) and it lacks CAP_SYS_RESOURCE to raise it: sessions and '
                                'jobs get %s', name, _text(hard), _text(own_hard),
                                _text(own_hard))
                hard = own_hard
        if _value(soft) > _value(hard):
            soft = hard
        out.append((res, soft, hard))
    return out


def _text(limit: int) -> str:
    return 'unlimited' if limit == resource.RLIM_INFINITY else str(limit)


def apply_rlimits(limits: Sequence[Sequence[int]]) -> None:
    """setrlimit each ``(resource, soft, hard)`` on this process (children inherit them)."""
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, hard))


# --- the drop -------------------------------------------------------------------------------


def _forget_gateway_signals() -> None:
    """In the fork, before the drop: forget the parent's signal handling.

    The fork still has the gateway's Python signal handlers and their wake-up socket.  Once
    the drop makes this process the account's, a signal the user sends it before exec would
    be written into that socket and handled by the *gateway* (a SIGTERM stopped it, a SIGHUP
    reloaded it).  So: no wake-up socket, and every handled signal back to its default."""
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def _child_setup(uid: int, gid: int, groups: Sequence[int], home: str, take_tty: bool,
                 rlimits: Sequence[RLimit], parent: int | None) -> None:
    """Runs in the forked child (a session leader, still root): limits, drop, then as the
    user harden, take the tty, go home.  With *parent* (the PAM helper's pid), the child is
    also killed when that parent dies (set after the drop, which would clear it)."""
    _forget_gateway_signals()
    try:
        apply_rlimits(rlimits)
    except OSError as exc:
        os.write(2, f'xos-sshd: cannot set resource limits: {exc}\n'.encode())
        raise
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    set_no_new_privs()
    if parent is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the PAM helper blocks signals
    if take_tty:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        os.chdir(home)
    except OSError:
        os.chdir('/')


def popen_as(uid: int, gid: int, groups: Sequence[int], home: str, argv: Sequence[str],
             env: Mapping[str, str], stdio: Stdio, *, executable: str, take_tty: bool = False,
             rlimits: Sequence[RLimit] = (), die_with_parent: bool = False
             ) -> subprocess.Popen[bytes]:
    """The one way a process is started as an account (the gateway's sessions and the PAM
    helper's user process): *argv* runs with exactly *uid*, *gid* and *groups*, as a session
    leader, no_new_privs set, an empty signal mask, and only *env* in its environment.
    *die_with_parent*: SIGKILL it when this process dies (the PAM helper, which cannot
    forward a SIGKILL it gets itself)."""
    if uid == 0 or gid == 0:
        raise SpawnError(f'refusing to start a process as uid {uid}/gid {gid}')
    parent = os.getpid() if die_with_parent else None
    return subprocess.Popen(
        list(argv), executable=executable, env=dict(env),
        stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
        start_new_session=True, close_fds=True,
        preexec_fn=lambda: _child_setup(uid, gid, groups, home, take_tty, rlimits, parent))


def spawn_as(account: LocalAccount, argv: Sequence[str], env: Mapping[str, str], stdio: Stdio,
             *, executable: str, take_tty: bool = False, session: SessionConfig | None = None,
             rhost: str = '') -> subprocess.Popen[bytes]:
    """Run *argv* (``argv[0]`` may be ``-bash`` for a login shell) as *account*.

    The child is a session leader in its own process group, with exactly the account's uid,
    primary gid and supplementary gids, no_new_privs set, the ``[session]`` resource limits,
    and only *env* in its environment.  With ``session.pam`` the returned process is the
    per-session PAM helper (:func:`.pamsession.launch`; *rhost* is the client's address for
    ``PAM_RHOST``), which forwards signals to the user's process and exits as it did.
    """
    if session is None:
        from ..config import SessionConfig
        session = SessionConfig()
    if account.uid == 0 or account.gid == 0:
        raise SpawnError(f'refusing to start a process as uid {account.uid}/gid {account.gid}')
    groups = [gid for _name, gid in account.groups]
    try:
        rlimits = child_rlimits(session.rlimits)
        if session.pam:
            from .pamsession import launch
            return launch(session, account, groups, argv, env, stdio, executable=executable,
                          take_tty=take_tty, rhost=rhost, rlimits=rlimits)
        return popen_as(account.uid, account.gid, groups, account.home, argv, env, stdio,
                        executable=executable, take_tty=take_tty, rlimits=rlimits)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SpawnError(f'cannot start {executable} as {account.name}: {exc}') from None
