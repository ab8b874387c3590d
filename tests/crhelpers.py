"""Helpers shared by the checkpoint/restart tests (real CRIU, real uids); fixtures: crfixtures.py.

Accounts are :class:`LocalAccount` values made here with a uid from a range no /etc/passwd
entry uses, and a home under a root-owned 0755 directory (pytest's tmp dirs are 0700, which
the account could not traverse).  While a test runs, the test process is a child subreaper,
so job inits (which outlive the helper that forked them) are re-parented to it and reaped at
the end instead of piling up as zombies under this sandbox's pid 1, which does not reap.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from xos_sshd.ams import LocalAccount

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def reap_zombie_children() -> None:
    """Collect zombies that are our children (job inits re-parented to us), nothing else."""
    me = str(os.getpid())
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[0] == 'Z' and fields[1] == me:
            try:
                os.waitpid(int(entry), os.WNOHANG)
            except ChildProcessError:
                pass


def uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes of *uid*."""
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if os.stat(f'/proc/{entry}').st_uid != uid:
                    continue
                with open(f'/proc/{entry}/stat') as f:
                    if f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X'):
                        out.append(int(entry))
            except OSError:
                continue
    return out


def make_account(base: Path, uid: int, groups: tuple[tuple[str, int], ...] = ()) -> LocalAccount:
    home = base / f'cr{uid}'
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    return LocalAccount(name=f'cr{uid}', uid=uid, gid=uid, groups=groups, home=str(home),
                        shell='/bin/sh', gecos='', vo='dev', vo_user=f'user{uid}')


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = 'condition') -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def ints(path: str | Path) -> list[int]:
    """The integers of a counter file, one per line (a partial last line ignored)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.split('\n')[:-1]
    return [int(x.split()[-1]) for x in lines if x.strip()]


def kill_tree_of(job_pid: int) -> None:
    """SIGKILL a job's init: the kernel then ends its whole PID namespace."""
    try:
        os.kill(job_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
