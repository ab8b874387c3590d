"""A FUSE file system that never answers, mounted over a directory (a user's home): any
access to it blocks, as with a dead NFS server or a user's own FUSE mount.

The kernel queues every request until the server answers its INIT, which never comes; the
waits are killable, and closing the server's descriptor (:meth:`HungMount.abort`) fails them
all with ENOTCONN.  Without ``allow_other`` only the mount's ``user_id`` gets queued (root
gets EACCES at once); with it, root's own ``lstat`` of the home hangs too.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest


class HungMount:
    """A mounted never-answering FUSE file system (context manager: abort and unmount)."""

    def __init__(self, path: str, uid: int, gid: int, allow_other: bool = False):
        self.path = path
        self.fd: int | None = os.open('/dev/fuse', os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f'fd={self.fd},rootmode=40000,user_id={uid},group_id={gid}'
        if allow_other:
            opts += ',allow_other'
        if libc.mount(b'xos-hang', path.encode(), b'fuse', 0, opts.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            pytest.skip(f'cannot mount FUSE here: {os.strerror(err)}')

    def abort(self) -> None:
        """The server goes away: every waiting and later access fails (ENOTCONN)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unmount(self) -> None:
        self.abort()
        subprocess.run(['umount', '-l', self.path], check=False, capture_output=True)

    def __enter__(self) -> 'HungMount':
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def threads_waiting_on_fuse(pid: int) -> int:
    """How many threads of *pid* wait in FUSE right now (``wchan`` ``fuse_*``)."""
    n = 0
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            with open(f'/proc/{pid}/task/{tid}/wchan') as f:
                if f.read().startswith('fuse'):
                    n += 1
        except FileNotFoundError:
            pass
    return n
