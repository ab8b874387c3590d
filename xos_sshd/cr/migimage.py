"""The image side of a migration: seal at the source, verify and assemble at the target.

**Source** (:func:`seal`): the dump CRIU wrote *as the account* into its spool directory is
taken over exactly as for a stored image (:func:`imagefs.take_dump`: the directory becomes
root 0700 first, every entry must be a regular file of the account with one link and no
writer, then root 0400 and hashed), its credentials are checked, and a manifest over *those
files* is signed with the node's image key.  The files are sent as the usual archive
(:func:`imageverify.write_archive`, hashes re-checked while streaming).  Nothing is stored.

**Target**: the archive is received into a root 0700 staging directory
(``STATE/cr-migrate/<uid>/<random>/``) and verified exactly as an import
(:func:`receive_signed`: strict tar reader, signature by a trusted node key, hashes,
owner == the caller, in-image credentials == the caller's account, the byte quota) but not
stored.  In ``page-server`` mode the pages came separately, through the user's relay, and a
CRIU *page server running as the account* wrote them into a directory of the account's
(``<spool>/<uid>/<id>/``, made by root inside root-owned 0711 parents): the gateway never
writes page data itself, and it takes that directory over like a dump (:func:`take_pages`:
root 0700 first, only ``pagemap-N.img``/``pages-N.img``/``pagemap-shmem-N.img`` regular
files of the account, one link, no writer, then root 0400), so no path the user controls
is ever followed by root and nothing root writes lands where the user can write.

Why the pages need no node signature: they are the job's own memory, i.e. bytes the user
could have written into their process anyway, and they reach only a CRIU restoring as the
user with no more than ``CAP_CHECKPOINT_RESTORE``.  Everything that decides *what runs and
as whom* — the credentials, the process tree, the executable mappings, the files — is in
the signed part (core, mm, pstree, files... images), checked before CRIU reads anything,
and the restored processes are vetted again (:mod:`xos_sshd.cr.nsjob`).  A pagemap names
addresses; CRIU fills only the private mappings the signed ``mm`` image declares.  (In ``lazy-pages`` mode the pagemap itself is in the signed part; only page contents
travel later, straight into the restored memory.)

:func:`assemble` hard-links the verified files and the taken-over page files into a fresh
restore directory (``STATE/cr-restore/<uid>/``, the image store's, read-only for the
account through an ACL) for :meth:`JobManager.restore`.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..ams import LocalAccount
from .imagefs import (
    copy_file,
    grant_read,
    open_dir,
    prune,
    remove,
    root_dir,
    take_dump,
)
from .images import TEMP_TTL, ImageStore
from .imageverify import check_account, check_creds, receive_signed_archive, write_archive
from .manifest import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    ImageError,
    Manifest,
    Owner,
    sign,
)

#: What a CRIU page server writes (CRIU 4: ``pagemap-<pid>.img``, ``pages-<id>.img``,
#: shared memory ``pagemap-shmem-<id>.img``).
PAGE_FILE = re.compile(r'^(pagemap-[0-9]{1,10}|pages-[0-9]{1,10}|pagemap-shmem-[0-9]{1,20})\.img\Z')


@dataclass
class Sealed:
    """A dump taken over and signed at the source (``dir_fd``: root 0700, files 0400)."""

    path: str
    dir_fd: int
    manifest: Manifest
    mbytes: bytes
    sig: bytes

    @property
    def size(self) -> int:
        return self.manifest.size_bytes

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def seal(store: ImageStore, spool_dir: str, account: LocalAccount, owner: Owner,
         job_id: str, command: Sequence[str], criu_version: str) -> Sealed:
    """Take over the dump in *spool_dir* (written by CRIU as *account*) and sign a manifest
    over the files in it.  ImageError (``bad-archive``, ``wrong-credentials``) on a bad dump."""
    check_account(account)
    parent, leaf = os.path.split(os.path.abspath(spool_dir))
    pfd = open_dir(parent)
    try:
        pst = os.fstat(pfd)
        if pst.st_uid != 0 or pst.st_mode & 0o022:
            raise ImageError('bad-archive', f'{parent} must be a root-owned directory not '
                             'writable by others')
        dfd = open_dir(leaf, pfd)
    finally:
        os.close(pfd)
    try:
        files = take_dump(dfd, account)
        check_creds(dfd, sorted(files), account)
        m = Manifest(id=leaf, owner=owner, uid=account.uid, gid=account.gid,
                     command=tuple(command), job_id=job_id, node=store.node_name,
                     created=time.time(), criu_version=criu_version,
                     signer=store.node_key.fingerprint, files=files)
        mbytes = m.to_bytes()
        return Sealed(spool_dir, dfd, m, mbytes, sign(store.node_key, mbytes))
    except BaseException:
        os.close(dfd)
        raise


def send_sealed(sealed: Sealed, out: BinaryIO) -> None:
    """Write the signed archive of *sealed* to *out* (blocking; a worker thread's job)."""
    write_archive(out, sealed.dir_fd, sealed.manifest, sealed.mbytes, sealed.sig)
    out.flush()


@dataclass
class Staged:
    """A verified signed part at the target: ``STATE/cr-migrate/<uid>/<name>/``."""

    path: str
    manifest: Manifest

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _migrate_root(store: ImageStore, uid: int) -> int:
    """``STATE/cr-migrate/<uid>/`` (root 0700, made on first use): its fd."""
    top = open_dir(str(store.state_dir))
    try:
        mfd = root_dir(top, 'cr-migrate', 0o700)
    finally:
        os.close(top)
    try:
        ufd = root_dir(mfd, str(uid), 0o700)
    finally:
        os.close(mfd)
    prune(ufd, TEMP_TTL)
    return ufd


def quota_error(store: ImageStore, uid: int, used: int, more: int) -> ImageError:
    return ImageError('quota-exceeded', f'image quota exceeded for uid {uid}: the migration '
                      f'would put {used + more} bytes on disk of {store.quota_bytes} allowed '
                      f'({used} used by images)')


def receive_signed(store: ImageStore, account: LocalAccount, owner: Owner, src: BinaryIO,
                   budget: int, used: int) -> Staged:
    """Read and verify the signed part from *src* into a fresh staging directory, as an
    import does (hostile input), without storing it; at most *budget* bytes of files."""
    check_account(account)
    ufd = _migrate_root(store, account.uid)
    name = secrets.token_hex(8)
    os.mkdir(name, 0o700, dir_fd=ufd)
    try:
        sfd = open_dir(name, ufd)
        try:
            manifest, _ = receive_signed_archive(
                sfd, src, store.trusted, account, owner, budget,
                lambda total: quota_error(store, account.uid, used, total))
        finally:
            os.close(sfd)
    except BaseException:
        remove(ufd, name)
        raise
    finally:
        os.close(ufd)
    return Staged(str(store.state_dir / 'cr-migrate' / str(account.uid) / name), manifest)


def take_pages(recv_dir: str, account: LocalAccount) -> dict[str, FileEntry]:
    """Take over what the account's page server wrote into *recv_dir*: only page files
    (:data:`PAGE_FILE`), each a regular file of the account with one link and no writer;
    they become root 0400.  ImageError ``bad-archive`` naming anything else."""
    parent, leaf = os.path.split(os.path.abspath(recv_dir))
    pfd = open_dir(parent)
    try:
        pst = os.fstat(pfd)
        if pst.st_uid != 0 or pst.st_mode & 0o022:
            raise ImageError('bad-archive', f'{parent} must be root-owned')
        dfd = open_dir(leaf, pfd)
    finally:
        os.close(pfd)
    try:
        os.fchown(dfd, 0, 0)  # before anything else: the account can no longer add or rename
        os.fchmod(dfd, 0o700)
        for name in os.listdir(dfd):
            if not PAGE_FILE.match(name):
                raise ImageError('bad-archive', f'the page server wrote {name[:100]!r}, which '
                                 'is not a page file')
        if not os.listdir(dfd):
            raise ImageError('bad-archive', 'no pages arrived')
        return take_dump(dfd, account)
    finally:
        os.close(dfd)


def assemble(store: ImageStore, account: LocalAccount, staged: Staged,
             pages_dir: str | None = None,
             pages: Mapping[str, FileEntry] | None = None) -> str:
    """A fresh restore directory (the image store's ``cr-restore/<uid>/``) holding the
    verified signed files and, in page-server mode, the taken-over page files; readable by
    *account* only.  A page file may not shadow a signed one."""
    pages = pages or {}
    clash = sorted(set(pages) & (set(staged.manifest.files) | {MANIFEST, SIGNATURE}))
    if clash:
        raise ImageError('bad-archive', f'page files {clash[:5]} clash with signed files')
    rootfd = open_dir(str(store.restore_root))
    try:
        ufd = root_dir(rootfd, str(account.uid), 0o711)
    finally:
        os.close(rootfd)
    name = f'{staged.manifest.id}-m{secrets.token_hex(6)}'
    try:
        prune(ufd, TEMP_TTL)
        os.mkdir(name, 0o700, dir_fd=ufd)
        rfd = open_dir(name, ufd)
        try:
            sources: list[tuple[str, Mapping[str, FileEntry]]] = [(staged.path,
                                                                   staged.manifest.files)]
            if pages_dir is not None:
                sources.append((pages_dir, pages))
            for src, entries in sources:
                sfd = open_dir(src)
                try:
                    for fname in sorted(entries):
                        st = os.stat(fname, dir_fd=sfd, follow_symlinks=False)
                        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                            raise ImageError('tampered', f'{fname} is not a root-owned file')
                        try:  # the very inode verified (or taken over) before
                            os.link(fname, fname, src_dir_fd=sfd, dst_dir_fd=rfd,
                                    follow_symlinks=False)
                        except OSError as exc:
                            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                                raise
                            want = entries[fname]
                            if copy_file(sfd, rfd, fname) != (want.size, want.sha256):
                                raise ImageError('tampered', f'{fname} changed') from None
                finally:
                    os.close(sfd)
            grant_read(rfd, sorted([*staged.manifest.files, *pages]), account)
        finally:
            os.close(rfd)
    except BaseException:
        remove(ufd, name)
        os.close(ufd)
        raise
    os.close(ufd)
    return str(store.restore_root / str(account.uid) / name)


def discard(path: str | Path | None) -> None:
    """Remove a directory this module (or the spool) made, without following links."""
    if not path:
        return
    parent, leaf = os.path.split(os.path.abspath(path))
    try:
        pfd = open_dir(parent)
    except OSError:
        return
    try:
        remove(pfd, leaf)
    finally:
        os.close(pfd)
