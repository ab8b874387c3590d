"""Root-side file handling for the image store: by descriptor, never following a link.

The image store (:mod:`xos_sshd.cr.images`) works in directories that are either root's own
or, for a fresh dump, written by an account that may be hostile.  Everything here goes
through directory descriptors with ``O_NOFOLLOW`` and checks what it opened with ``fstat``.

:func:`take_dump` is the hostile part: CRIU wrote a dump *as the account* into a directory
the account owns.  The directory is made root 0700 *first*, so the account can neither add,
remove nor rename entries any more; then every entry is examined:

* anything but a regular file (symlink, fifo, device, socket, directory) or a name that is
  not a plain image file name refuses the dump (``bad-archive``, naming the entry) before any
  file is opened; nothing is followed, nothing is read;
* each file must belong to the account (CRIU wrote it as the account: a root-owned file in
  there was planted through a hard link) and have no other link; it then becomes root 0400;
* nobody may still hold it open for writing or mapped writable (else its content could
  change after hashing): a read lease (``F_SETLEASE``) can be taken only then.  Where leases
  are unavailable the file is copied into a fresh root-made file, hashed while copied.

:func:`grant_read` gives exactly one account read access to a restore directory (a POSIX
ACL; the account's primary group where the filesystem has no ACLs).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import secrets
import stat
import struct
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from ..ams import LocalAccount
from .manifest import MAX_FILES, FileEntry, ImageError, valid_name

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
ACL_XATTR = 'system.posix_acl_access'


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """A directory descriptor; a symlink in the last component fails (``ELOOP``)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def root_dir(parent_fd: int, name: str, mode: int) -> int:
    """Open (making it if needed) a root-owned directory *name* with *mode*; its fd."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        pass
    fd = open_dir(name, parent_fd)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: A tree being removed is walked by descriptor this deep; below that, :func:`_remove_deep`
#: (``rm -rf``) takes the rest.  Each level holds a descriptor (and two Python frames).
MAX_WALK_DEPTH = 64
#: How a directory inside a tree being removed is opened: never through a symlink
#: (``O_NOFOLLOW``), never anything but a directory (``O_DIRECTORY``: a fifo or a device is
#: refused before the kernel opens it), never blocking, never as a controlling terminal.
SUBDIR_FLAGS = DIR_FLAGS | os.O_NONBLOCK | os.O_NOCTTY
#: How often one entry is looked at again when it changed between the look and the action.
ENTRY_TRIES = 8


def remove(parent_fd: int, name: str) -> None:
    """Delete *name* (a tree, a file or a symlink) in *parent_fd*, never following a link
    and never opening anything but a directory, also while the account that owns the tree
    keeps changing it (it may swap a directory for a symlink to a fifo or a device between
    any two of our calls: ``shutil.rmtree`` checks an entry, then opens it by name, and so
    opened whatever the account had swapped in).  Failures are logged, not raised: a tree the
    account keeps filling is left for the next prune."""
    for attempt in range(3):  # an account process may still add to its own subdirectories
        try:
            _remove_entry(parent_fd, name, 0)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if attempt == 2:
                log.warning('could not remove %s: %s', name, exc)


def _remove_entry(parent_fd: int, name: str, depth: int) -> None:
    """Remove the entry *name* of *parent_fd* (see :func:`remove`): a non-directory is
    unlinked (never opened); a directory is opened with :data:`SUBDIR_FLAGS`, checked to be
    the one looked at (and on the same filesystem), emptied, then removed.  An entry that
    changed between the look and the action is looked at again."""
    for _ in range(ENTRY_TRIES):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            try:
                os.unlink(name, dir_fd=parent_fd)
                return
            except FileNotFoundError:
                return
            except IsADirectoryError:
                continue  # a directory now: look again
        if depth >= MAX_WALK_DEPTH:
            _remove_deep(parent_fd, name)
            return
        try:
            fd = os.open(name, SUBDIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                continue  # swapped for a symlink or a file since the look: look again
            raise
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue  # another directory was swapped in: look again
            pst = os.fstat(parent_fd)
            if fst.st_dev != pst.st_dev:
                raise OSError(errno.EXDEV, f'{name} is on another filesystem (a mount point)')
            with os.scandir(fd) as entries:
                names = [entry.name for entry in entries]
            for child in names:
                _remove_entry(fd, child, depth + 1)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except NotADirectoryError:
            continue  # swapped after it was emptied: look again
    raise OSError(errno.EAGAIN, f'{name} kept changing while being removed')


def _remove_deep(parent_fd: int, name: str) -> None:
    """Remove a tree too deep for the walk of :func:`remove` with GNU ``rm -rf``, which walks
    it iteratively by descriptor and never follows a link; it is handed the tree through our
    descriptor of its parent (``/proc/PID/fd/N/NAME``), so no path the account controls is
    resolved."""
    path = f'/proc/{os.getpid()}/fd/{parent_fd}/{name}'
    res = subprocess.run(['rm', '-rf', '--one-file-system', '--', path], capture_output=True,
                         text=True, check=False, timeout=600)
    if res.returncode != 0:
        raise OSError(errno.EIO, f'rm -rf {name}: {res.stderr.strip()[:500]}')


def remove_path(path: str | os.PathLike[str]) -> None:
    """:func:`remove` the entry at *path*, through a descriptor of its parent, which must be a
    root-owned directory nobody else can write (else nothing is removed and a warning is
    logged): then *path* itself cannot be swapped, whatever the account does inside it.  A
    missing parent is nothing to do."""
    parent, leaf = os.path.split(os.path.abspath(path))
    try:
        pfd = open_dir(parent)
    except FileNotFoundError:
        return
    try:
        st = os.fstat(pfd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            log.warning('not removing %s: %s is not a root-owned directory closed to others',
                        path, parent)
            return
        remove(pfd, leaf)
    finally:
        os.close(pfd)


def prune(dir_fd: int, ttl: float) -> None:
    """Remove entries of *dir_fd* not modified for *ttl* seconds (crash and caller leftovers)."""
    cutoff = time.time() - ttl
    for name in os.listdir(dir_fd):
        try:
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < cutoff:
                remove(dir_fd, name)
        except FileNotFoundError:
            continue


def hash_fd(fd: int) -> tuple[int, str]:
    """(size, sha256 hex) of the whole file behind *fd* (read from offset 0)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while True:
        n = os.preadv(fd, [buf], size)
        if not n:
            return size, h.hexdigest()
        h.update(view[:n])
        size += n


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_fd(src: int, dst: int) -> tuple[int, str]:
    """Copy *src* (from offset 0) to *dst*, hashing what was copied; (size, sha256)."""
    h = hashlib.sha256()
    size = 0
    while True:
        data = os.pread(src, CHUNK, size)
        if not data:
            return size, h.hexdigest()
        h.update(data)
        _write_all(dst, data)
        size += len(data)


def copy_file(src_dir: int, dst_dir: int, name: str) -> tuple[int, str]:
    """Copy *name* from *src_dir* into a new root 0400 file in *dst_dir*; (size, sha256)."""
    src = os.open(name, READ_FLAGS, dir_fd=src_dir)
    try:
        out = os.open(name, CREATE_FLAGS, 0o400, dir_fd=dst_dir)
        try:
            return copy_fd(src, out)
        finally:
            os.close(out)
    finally:
        os.close(src)


def write_new(dir_fd: int, name: str, data: bytes, mode: int = 0o400) -> None:
    """Create *name* (it must not exist) with *data*, synced."""
    fd = os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_capped(dir_fd: int, name: str, limit: int) -> bytes | None:
    """A small root-owned regular file's bytes; None if absent; ``tampered`` if odd."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError('tampered', f'{name}: {exc.strerror}') from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_size > limit:
            raise ImageError('tampered', f'{name} is not a root-owned file of at most {limit} bytes')
        return os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)


def no_writers(fd: int) -> bool | None:
    """Whether nobody has the file open for writing or mapped writable (a read lease can be
    taken only then).  None when leases are unavailable here."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        return None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISDIR, 'a directory'),
                       (stat.S_ISFIFO, 'a fifo'), (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return name
    return 'not a regular file'


# -- taking over a dump -----------------------------------------------------------------------

def _check_entry(name: str, st: os.stat_result, account: LocalAccount) -> None:
    """A dump entry must be a regular file of the account with no other link."""
    if not stat.S_ISREG(st.st_mode):
        raise ImageError('bad-archive', f'dump entry {name!r} is {kind(st.st_mode)}: only '
                         'regular files are accepted')
    if st.st_uid != account.uid:
        raise ImageError('bad-archive', f'dump entry {name!r} belongs to uid {st.st_uid}, '
                         f'not {account.name}: not written by its CRIU')
    if st.st_nlink != 1:
        raise ImageError('bad-archive', f'dump entry {name!r} has {st.st_nlink} links')


def _take_file(dfd: int, name: str, account: LocalAccount) -> tuple[int, str]:
    """Make one dump file root 0400 and hash it; (size, sha256).  See the module docstring."""
    lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    _check_entry(name, lst, account)
    fd = os.open(name, READ_FLAGS, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            raise ImageError('bad-archive', f'dump entry {name!r} changed while being taken')
        _check_entry(name, st, account)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o400)
        alone = no_writers(fd)
        if alone is False:
            raise ImageError('bad-archive', f'dump entry {name!r} is still open for writing')
        if alone:
            return hash_fd(fd)
        # No leases here: copy into a fresh root-made file nobody else can hold open.
        tmp = f'.copy-{secrets.token_hex(6)}'
        out = os.open(tmp, CREATE_FLAGS, 0o400, dir_fd=dfd)
        try:
            result = copy_fd(fd, out)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return result
    finally:
        os.close(fd)


def take_dump(dfd: int, account: LocalAccount) -> dict[str, FileEntry]:
    """Take over the dump directory *dfd* written by *account*'s CRIU: lock it, check every
    entry, make the files root 0400, hash them.  ``bad-archive`` naming the first bad entry."""
    os.fchown(dfd, 0, 0)  # first of all: the account may no longer change the directory
    os.fchmod(dfd, 0o700)
    names = sorted(os.listdir(dfd))
    if not names:
        raise ImageError('bad-archive', 'the dump is empty')
    if len(names) > MAX_FILES:
        raise ImageError('bad-archive', f'the dump has more than {MAX_FILES} files')
    for name in names:  # every entry is checked before any file is opened
        if not valid_name(name):
            raise ImageError('bad-archive', f'dump entry {name!r} is not an image file name')
        _check_entry(name, os.stat(name, dir_fd=dfd, follow_symlinks=False), account)
    return {name: FileEntry(*_take_file(dfd, name, account)) for name in names}


# -- restore directories ----------------------------------------------------------------------

def posix_acl(uid: int, perm: int, owner_perm: int) -> bytes:
    """A POSIX access ACL in the kernel's xattr form: owner *owner_perm*, user *uid* *perm*
    (and the mask), owning group and others nothing."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, owner_perm, undefined), (0x02, perm, uid), (0x04, 0, undefined),
               (0x10, perm, undefined), (0x20, 0, undefined)]
    return struct.pack('<I', 2) + b''.join(struct.pack('<HHI', *e) for e in entries)


def grant_read(dir_fd: int, names: Sequence[str], account: LocalAccount) -> None:
    """Let exactly *account* read the directory and its files; nobody but root may write."""
    try:
        for name in names:
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            try:
                os.setxattr(fd, ACL_XATTR, posix_acl(account.uid, 4, 4))
            finally:
                os.close(fd)
        os.setxattr(dir_fd, ACL_XATTR, posix_acl(account.uid, 5, 7))
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    log.warning('no POSIX ACLs here: restore directory given to group %d instead', account.gid)
    for name in names:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
        try:
            os.fchown(fd, 0, account.gid)
            os.fchmod(fd, 0o440)
        finally:
            os.close(fd)
    os.fchown(dir_fd, 0, account.gid)
    os.fchmod(dir_fd, 0o750)


# -- streams ----------------------------------------------------------------------------------

class FileSink:
    """An archive member being written into a staging directory, hashed as it comes; on
    close, ``done[name] = (size, sha256)``."""

    def __init__(self, fd: int, name: str, done: dict[str, tuple[int, str]]) -> None:
        self.fd, self.name, self.done = fd, name, done
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        _write_all(self.fd, data)
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)
        self.done[self.name] = (self.size, self.hash.hexdigest())


class MemorySink:
    """A small member (manifest, signature) kept in memory; on close ``done[name] = bytes``."""

    def __init__(self, name: str, done: dict[str, bytes]) -> None:
        self.name, self.done = name, done
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.done[self.name] = b''.join(self.parts)


class HashingReader(io.RawIOBase):
    """Reads a file by descriptor (for tarfile), hashing what it hands out."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd, self.pos, self.hash = fd, 0, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = os.preadv(self.fd, [buf], self.pos)
        self.hash.update(memoryview(buf)[:n])
        self.pos += n
        return n
