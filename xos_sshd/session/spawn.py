"""Start a process as a mapped account: the only place where the gateway drops to a user.

``subprocess.Popen`` does setsid, setgroups, setregid and setreuid in the child in that
order; the preexec step below runs *after* them, so everything it does (no_new_privs, taking
the controlling tty, chdir into the home directory) is done with the user's credentials and
the root process never opens a user-controlled path.  setreuid with both ids also sets the
saved uid, so the child cannot get root back.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import termios
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

from ..ams import LocalAccount
from .libc import set_no_new_privs


class SpawnError(Exception):
    """The user's process could not be started; the message says why."""


@dataclass(frozen=True)
class Stdio:
    """The three file descriptors the child gets (a pty slave, or pipe ends)."""

    stdin: int | IO[bytes]
    stdout: int | IO[bytes]
    stderr: int | IO[bytes]


def _after_uid_drop(home: str, take_tty: bool) -> None:
    """Runs in the child, already as the user: harden, take the tty, go home."""
    set_no_new_privs()
    if take_tty:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        os.chdir(home)
    except OSError:
        os.chdir('/')


def spawn_as(account: LocalAccount, argv: Sequence[str], env: Mapping[str, str], stdio: Stdio,
             *, executable: str, take_tty: bool = False) -> subprocess.Popen[bytes]:
    """Run *argv* (``argv[0]`` may be ``-bash`` for a login shell) as *account*.

    The child is a session leader in its own process group, with exactly the account's uid,
    primary gid and supplementary gids, no_new_privs set, and only *env* in its environment.
    """
    if account.uid == 0 or account.gid == 0:
        raise SpawnError(f'refusing to start a process as uid {account.uid}/gid {account.gid}')
    try:
        return subprocess.Popen(
            list(argv), executable=executable, env=dict(env),
            stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
            user=account.uid, group=account.gid,
            extra_groups=[gid for _name, gid in account.groups],
            start_new_session=True, close_fds=True,
            preexec_fn=lambda: _after_uid_drop(account.home, take_tty))
    except (OSError, subprocess.SubprocessError) as exc:
        raise SpawnError(f'cannot start {executable} as {account.name}: {exc}') from None
