"""Start a process as a mapped account: the only place where the gateway drops to a user.

The gateway never waits on anything the account can influence.  It starts the exec shim
``xos-session-exec`` (``native/xos_session_exec.c``) as root, without a preexec step, so
CPython's ``Popen`` uses vfork: nothing of the gateway runs in the child, and ``Popen``
returns as soon as the shim is executing -- still as root, which no user can signal.  The
shim then does what used to happen in a fork of the gateway while ``Popen`` blocked the
event loop: it sets the session's resource limits (``[session] rlimits``: only root may
raise a hard limit), ``setgroups``, ``setresgid``, ``setresuid`` (all three ids, checked,
so the child can never get root back), and only *then*, with the user's credentials, sets
no_new_privs, an empty signal mask and default signal actions, takes the controlling tty,
changes into the home directory (``/`` when that fails) and execs the target.  A user who
stops their processes in a loop (``kill -STOP -1``), or whose home hangs (a FUSE mount of
theirs, a dead NFS server), now stops their own session only, never the gateway's loop.
What fails after ``Popen`` returned is told on the session's stderr in one line, with exit
status 125 (the set-up failed), 126 (cannot run the program) or 127 (no such program); the
gateway audits that status as any other.  The environment goes to the shim through a memfd,
never as its own environment: the dynamic loader obeys ``LD_PRELOAD``/``GLIBC_TUNABLES`` of a
plain root process.

Why a C shim and not ``python -I -S shim.py`` (as :mod:`xos_sshd.cr.nsjob` does for jobs):
both were built with the same command line and measured on the 2-core test machine (other
test runs going on), session start alone (``true`` on an open connection, asyncssh client,
300 runs interleaved, p50): C shim 6 ms, Python shim 26 ms, the former fork + preexec_fn
12 ms; through an OpenSSH multiplexed connection, C 14 ms against 21 ms before.  A Python
shim costs an interpreter start on every session's critical path (and CPU at every login on
a small node); the C program costs one exec, and CPython can vfork for it instead of forking
the gateway's whole address space.  ``bench/login.py --runs 80`` (login + ``true``, OpenSSH
client) gave p50 111-115 ms (C), 132-138 ms (Python), 81-97 ms (before): that number is
dominated by a 40 ms delayed-ACK stall in the key exchange, present with or without a
session process (a refused subsystem, which starts none, is ~110 ms with either code), which
the fork of the former code happened to dodge in half of the logins; it is not session start.
The shim is ~300 lines of libc-only C, built by ``make -C native`` (and ``make run``),
installed by ``make -C native install`` as :data:`DEFAULT_EXEC_HELPER`, checked by
``xos-sshd doctor``.

Before the shim's exec the child is the gateway's vfork, still root (no user may signal it):
CPython blocks every signal around the vfork and resets the handlers to their defaults before
the exec, and ``close_fds`` closes the gateway's signal wake-up socket, so nothing a user
sends can reach a gateway handler (tests/test_session_signal_race.py); after the exec the
shim resets every signal action and the mask itself.

Where the shim is found (:func:`exec_helper`): ``[session] exec_helper`` when set, else
:data:`DEFAULT_EXEC_HELPER`, else ``native/build/`` next to the package (a source checkout).
It is run as root for every session, so it must be a root-owned file in a root-owned
directory, neither writable by anyone else; anything else refuses the session.

With ``[session] pam = true`` the process the gateway starts is not the user's but a root
helper (:mod:`.pamsession`) that opens the PAM session and starts the user's process through
the very same :func:`popen_as`.
"""

from __future__ import annotations

import functools
import logging
import resource
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

# The launcher lives in .execshim (cheap to import for the PAM helper); its names are this
# module's API too.
from .execshim import (DEFAULT_EXEC_HELPER, DEV_EXEC_HELPER, RLimit, SpawnError,  # noqa: F401
                       Stdio, apply_rlimits, exec_helper, limit_text, popen_as, shim_argv,
                       unsafe_program)

if TYPE_CHECKING:
    from ..ams import LocalAccount
    from ..config import SessionConfig

log = logging.getLogger(__name__)

#: The capability that lets root raise a hard limit above its own (capabilities(7)).
_CAP_SYS_RESOURCE = 24
_warned: set[str] = set()


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
                                'jobs get %s', name, limit_text(hard), limit_text(own_hard),
                                limit_text(own_hard))
                hard = own_hard
        if _value(soft) > _value(hard):
            soft = hard
        out.append((res, soft, hard))
    return out


# --- sessions --------------------------------------------------------------------------------


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
        helper = exec_helper(session.exec_helper)
        rlimits = child_rlimits(session.rlimits)
        if session.pam:
            from .pamsession import launch
            return launch(session, account, groups, argv, env, stdio, executable=executable,
                          take_tty=take_tty, rhost=rhost, rlimits=rlimits, helper=helper)
        return popen_as(account.uid, account.gid, groups, account.home, argv, env, stdio,
                        executable=executable, take_tty=take_tty, rlimits=rlimits,
                        helper=helper)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise SpawnError(f'cannot start {executable} as {account.name}: {exc}') from None


def exec_helper_status(configured: Path | None) -> tuple[str, str, str, str]:
    """``xos-sshd doctor``'s line on the exec shim: ``(level, check, detail, fix)``.  It is
    found, safe to run as root, and is the shim (run without arguments it only prints its
    usage and exits 125: nothing is started)."""
    check = 'session exec helper'
    fix = ('make -C native install (or set [session] exec_helper to a root-owned build of '
           'native/xos_session_exec.c)')
    try:
        path = exec_helper(configured)
        probe = subprocess.run([path], capture_output=True, text=True, timeout=10, env={})
    except (SpawnError, OSError, subprocess.SubprocessError) as exc:
        return 'fail', check, str(exc).removeprefix(check + ' '), fix
    if probe.returncode != 125 or 'usage: xos-session-exec' not in probe.stderr:
        return ('fail', check, f'{path} is not xos-session-exec (exit status '
                f'{probe.returncode}): every session would fail', fix)
    return 'ok', check, f'{path} (sessions start through it)', ''
