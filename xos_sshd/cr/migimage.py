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
import itertools
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    remove_path,
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

log = logging.getLogger(__name__)

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


#: The kinds of :class:`MigrationLedger` entries: a migration stream (either direction), an
#: ``xos-images`` upload (cr/sftp.py).  Only migrations count as streams (:meth:`live`).
MIGRATION = 'migration'
UPLOAD = 'upload'
_OTHERS = {MIGRATION: 'incoming migration', UPLOAD: 'upload'}


def quota_error(store: ImageStore, uid: int, used: int, this: int, others: int = 0,
                entries: Mapping[str, int] | None = None, what: str = MIGRATION) -> ImageError:
    """The refusal of a *what* (migration, upload) that would stage *this* bytes for *uid*
    while its images use *used* and its other incoming entries (*entries*: kind -> how
    many) have *others* bytes staged."""
    kinds = [(k, n) for k, n in (entries or {}).items() if n]
    besides = (f' and {others} bytes staged by ' + ' and '.join(
        f'{n} {"other " if k == what else ""}{_OTHERS.get(k, k)}{"s" if n != 1 else ""}'
        for k, n in kinds) if kinds else '')
    return ImageError('quota-exceeded', f'image quota exceeded for uid {uid}: this {what} '
                      f'would stage {this} bytes; with {used} bytes in its images{besides} '
                      f'that is {used + others + this} of {store.quota_bytes} allowed')


class MigrationLedger:
    """What one gateway takes in, per account: its live migration streams (either direction:
    each holds a worker thread, spool space and a frozen or arriving job) and its
    ``xos-images`` uploads, and how many bytes each incoming one has *staged* on this node's
    disk (signed parts, page files, archives being imported, upload spool files).

    An account's staged bytes, over all its live entries of every kind, plus what its images
    use, never pass its image quota: :meth:`charge` refuses (``quota-exceeded``) the bytes
    that would.  What the images use is the latest figure the entries learnt
    (:meth:`note_stored`, at each entry's start and after an import).  Only migration
    streams count in :meth:`live` (the concurrency limits of cr/migrate.py).  Belongs to one
    :class:`CRService`; thread-safe (archives are received in worker threads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uid: dict[int, int] = {}  # entry token -> uid
        self._kind: dict[int, str] = {}  # entry token -> MIGRATION | UPLOAD
        self._staged: dict[int, int] = {}  # entry token -> bytes it has staged
        self._stored: dict[int, int] = {}  # uid -> bytes its images use (last known)
        self._tokens = itertools.count(1)

    def enter(self, uid: int, kind: str = MIGRATION) -> int:
        """Count a new entry of *uid* (a migration stream, or an upload); its token (give it
        back with :meth:`leave`)."""
        if kind not in _OTHERS:
            raise ValueError(f'unknown ledger entry kind {kind!r}')
        with self._lock:
            token = next(self._tokens)
            self._uid[token], self._kind[token], self._staged[token] = uid, kind, 0
            return token

    def leave(self, token: int) -> None:
        """The entry ended and what it staged is gone: it counts no more."""
        with self._lock:
            uid = self._uid.pop(token, None)
            self._kind.pop(token, None)
            self._staged.pop(token, None)
            if uid is not None and uid not in self._uid.values():
                self._stored.pop(uid, None)

    def live(self, uid: int | None = None) -> int:
        """Live migration streams of *uid* (of every account: None); uploads not counted."""
        with self._lock:
            return sum(1 for t, u in self._uid.items()
                       if self._kind[t] == MIGRATION and (uid is None or u == uid))

    def note_stored(self, uid: int, used: int) -> None:
        """*uid*'s images use *used* bytes now (read from the image store).  While another
        entry of *uid* is live the figure never goes down: a read that raced an import of
        that entry finishing could be older than the import's own (over-counting only makes
        the quota stricter until the account's entries are gone)."""
        with self._lock:
            others = sum(1 for u in self._uid.values() if u == uid) > 1
            self._stored[uid] = max(used, self._stored.get(uid, 0)) if others else used

    def staged(self, uid: int) -> int:
        """Bytes staged by all live entries (migrations and uploads) of *uid*."""
        with self._lock:
            return sum(self._staged[t] for t, u in self._uid.items() if u == uid)

    def charge(self, token: int, nbytes: int, store: ImageStore) -> None:
        """Entry *token* is about to stage *nbytes* more; ImageError ``quota-exceeded`` (and
        nothing charged) when that would take its account past the image quota."""
        with self._lock:
            self._set(token, self._staged[token] + nbytes, store)

    def settle(self, token: int, total: int, store: ImageStore) -> None:
        """What entry *token* has staged is exactly *total* bytes (measured on disk), checked
        against the quota as :meth:`charge`."""
        with self._lock:
            self._set(token, total, store)

    def _set(self, token: int, total: int, store: ImageStore) -> None:
        uid = self._uid[token]
        others = [t for t, u in self._uid.items() if u == uid and t != token and self._staged[t]]
        other_bytes = sum(self._staged[t] for t in others)
        used = self._stored.get(uid, 0)
        if used + other_bytes + total > store.quota_bytes:
            entries = {kind: sum(1 for t in others if self._kind[t] == kind) for kind in _OTHERS}
            raise quota_error(store, uid, used, total, other_bytes, entries, self._kind[token])
        self._staged[token] = total


def receive_signed(store: ImageStore, account: LocalAccount, owner: Owner, src: BinaryIO,
                   budget: int, charge: Callable[[int], None]) -> Staged:
    """Read and verify the signed part from *src* into a fresh staging directory, as an
    import does (hostile input), without storing it; at most *budget* bytes of files, each
    member's bytes passed to *charge* (:meth:`MigrationLedger.charge`: it refuses what would
    pass the quota) before they are written."""
    check_account(account)
    ufd = _migrate_root(store, account.uid)
    name = secrets.token_hex(8)
    os.mkdir(name, 0o700, dir_fd=ufd)
    try:
        sfd = open_dir(name, ufd)
        try:
            manifest, _ = receive_signed_archive(
                sfd, src, store.trusted, account, owner, budget,
                lambda total: quota_error(store, account.uid, store.quota_bytes - budget, total),
                charge=charge)
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


def prune_at_start(state_dir: str | Path, spool_dir: str | Path) -> list[str]:
    """Remove what a gateway that stopped mid-way left in the spool (``<spool>/<uid>/*``:
    dumps, page-server and lazy-pages work directories, written by accounts, holding
    whatever the account put there) and in ``STATE/cr-migrate/<uid>/*`` (signed parts being
    received).  Called once at gateway start, before any operation is served: nothing in
    there can be in use, and nothing counts it against any quota.  Nothing is followed
    (:func:`imagefs.remove`); an entry that is not what root makes there (a root-owned
    ``<uid>`` directory closed to others) is removed whole.  Returns what was removed, as
    ``TOP/UID/NAME`` (TOP: the directory's name); what could not be is logged by
    :func:`imagefs.remove` and left for the next start."""
    removed: list[str] = []
    for top in (Path(spool_dir), Path(state_dir) / 'cr-migrate'):
        try:
            tfd = open_dir(str(top))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning('not pruning %s: %s', top, exc.strerror)
            continue
        try:
            st = os.fstat(tfd)
            if st.st_uid != 0 or st.st_mode & 0o022:
                log.warning('not pruning %s: not a root-owned directory closed to others', top)
                continue
            for uid_name in sorted(os.listdir(tfd)):
                _prune_uid_dir(tfd, top.name, uid_name, removed)
        finally:
            os.close(tfd)
    return removed


def _prune_uid_dir(tfd: int, top: str, name: str, removed: list[str]) -> None:
    """Empty ``TOP/NAME`` (a ``<uid>`` directory root made) or remove it whole if it is
    anything else; append what went to *removed*."""
    try:
        ufd = open_dir(name, tfd)
    except OSError:  # a symlink or a file: root never puts one there
        remove(tfd, name)
        removed.append(f'{top}/{name}')
        return
    try:
        st = os.fstat(ufd)
        if not name.isdigit() or st.st_uid != 0 or st.st_mode & 0o022:
            whole = True
        else:
            whole = False
            for entry in sorted(os.listdir(ufd)):
                remove(ufd, entry)
                try:
                    os.stat(entry, dir_fd=ufd, follow_symlinks=False)
                except FileNotFoundError:
                    removed.append(f'{top}/{name}/{entry}')
    finally:
        os.close(ufd)
    if whole:
        remove(tfd, name)
        removed.append(f'{top}/{name}')


def discard(path: str | Path | None) -> None:
    """Remove a directory this module (or the spool) made, without following links, also
    while the account it was given to changes it (:func:`imagefs.remove_path`)."""
    if path:
        remove_path(path)
