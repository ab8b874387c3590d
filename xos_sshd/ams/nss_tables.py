"""Writing the NSS tables (``passwd``, ``group``) that libnss_xos serves.

Each table is replaced atomically: the new content goes to a temp file in
the same directory, is fsync'd, renamed over the old one, and the directory
is fsync'd.  A reader (libnss_xos, ``getent``) therefore opens either the
complete old table or the complete new one, never a torn one, and after a
crash the directory holds one of the two.

Writers in several processes (several gateways on one node, the admin CLI)
are serialised by an ``flock`` on ``nss_dir/.lock``; the caller re-reads the
database *after* taking the lock, so the last writer always writes the
newest committed state.

After the text tables, the binary index of ``nss_index.py`` (written by
another part, optional) is rebuilt through its ``write_index`` hook.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Callable, Sequence

from ..fsutil import TMP_MARK, atomic_write

log = logging.getLogger(__name__)

#: ``(name, uid, gid, gecos, home, shell)``
PasswdEntry = tuple[str, int, int, str, str, str]
#: ``(name, gid, members)``
GroupEntry = tuple[str, int, list[str]]

TABLE_MODE = 0o644
LOCK_NAME = ".lock"


def _field(text: str) -> str:
    """Make ``text`` safe for one colon-separated field (no ':', NUL or line breaks)."""
    return text.replace(":", "_").replace("\0", "_").replace("\n", " ").replace("\r", " ")


def clean_passwd(entries: Sequence[PasswdEntry]) -> list[PasswdEntry]:
    """The entries with gecos/home/shell made safe, so text tables and index agree."""
    return [(n, u, g, _field(gecos), _field(home), _field(shell)) for n, u, g, gecos, home, shell in entries]


def render_passwd(entries: Sequence[PasswdEntry]) -> bytes:
    """The /etc/passwd format, one line per entry, password field ``x``."""
    lines = [
        f"{name}:x:{uid}:{gid}:{gecos}:{home}:{shell}\n"
        for name, uid, gid, gecos, home, shell in clean_passwd(entries)
    ]
    return "".join(lines).encode("utf-8")


def render_group(entries: Sequence[GroupEntry]) -> bytes:
    """The /etc/group format, one line per entry, password field ``x``."""
    lines = [f"{name}:x:{gid}:{','.join(members)}\n" for name, gid, members in entries]
    return "".join(lines).encode("utf-8")


class NSSLock:
    """An exclusive ``flock`` on ``nss_dir/.lock`` (blocking; use off the event loop)."""

    def __init__(self, nss_dir: str) -> None:
        self.nss_dir = nss_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_dir(self.nss_dir)
        fd = os.open(os.path.join(self.nss_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it now; never blocks (for the event loop)."""
        ensure_dir(self.nss_dir)
        fd = os.open(os.path.join(self.nss_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "NSSLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def ensure_dir(nss_dir: str) -> None:
    """Create ``nss_dir`` (0755) if it is missing."""
    os.makedirs(nss_dir, mode=0o755, exist_ok=True)


def remove_stale_temps(nss_dir: str) -> list[str]:
    """Delete temp files a crashed writer left behind.  Call with the :class:`NSSLock` held."""
    removed: list[str] = []
    try:
        names = os.listdir(nss_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".") and TMP_MARK in name:
            try:
                os.unlink(os.path.join(nss_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _index_hook() -> Callable[..., object] | None:
    """The optional binary-index writer, imported lazily (the module is another part's)."""
    hook: Callable[..., object] | None
    try:
        from .nss_index import write_index as hook
    except ImportError:
        hook = None
    return hook


def write_tables(nss_dir: str, passwd_entries: Sequence[PasswdEntry], group_entries: Sequence[GroupEntry]) -> None:
    """Write ``group`` then ``passwd`` atomically, then the binary index if available.

    ``group`` goes first so a new account's gids resolve by the time its
    passwd line appears.  Blocking: run it in a thread, holding the
    :class:`NSSLock`.
    """
    ensure_dir(nss_dir)
    passwd_entries = clean_passwd(passwd_entries)
    atomic_write(os.path.join(nss_dir, "group"), render_group(group_entries))
    atomic_write(os.path.join(nss_dir, "passwd"), render_passwd(passwd_entries))
    write_index = _index_hook()
    if write_index is not None:
        write_index(nss_dir, list(passwd_entries), [(n, g, list(m)) for n, g, m in group_entries])
