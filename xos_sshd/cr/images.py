"""The signed image store: checkpoints kept root-owned, verified again at every use.

Design ("Checkpoint / restart"): a restored image runs with whatever credentials it records,
so an unverified image is a root exploit.  Every image is therefore taken over from the
account that dumped it without following anything it controls, hashed, signed with the
node's Ed25519 image key, and re-verified (signature by a trusted node key, sha256 of every
file, owner identity, in-image credentials) whenever it is imported, restored or exported.

Layout (all root-owned; ``STATE`` must be traversable by accounts, as for ``cr-spool``)::

    STATE/image_key, image_key.pub      the node key, 0600 / 0644 (see manifest.py)
    STATE/images/                       0711
    STATE/images/<uid>/                 0711
    STATE/images/<uid>/<id>/            0700  manifest.json, manifest.sig, the CRIU files: 0400
    STATE/images/.staging/<random>/     0700  imports and cross-filesystem commits in progress
    STATE/cr-restore/<uid>/             0711
    STATE/cr-restore/<uid>/<id>-<rnd>/  0750 + ACL user:<uid>:r-x; hard links of the image
                                        files, 0440 + ACL user:<uid>:r-- (restore_dir)
    STATE/cr-export/<uid>/<id>-<rnd>.tar  0600 (export_archive; the caller unlinks it)

Only the owning account can read a restore directory (POSIX ACL; on a filesystem without
ACLs the directory and files get the account's primary group instead), nobody but root can
write to it, and nobody else can read stored images at all: they hold the job's memory.
Restore and export leftovers older than :data:`TEMP_TTL` are pruned as new ones are made.

Commit (a dump written by CRIU *as the account* into ``<spool>/<uid>/<id>/``): the directory
is opened with ``O_NOFOLLOW`` and made root 0700 *first*, so the account can neither add nor
rename entries any more; then each entry is examined through the directory descriptor:
anything but a regular file (symlink, fifo, device, directory), a file not the account's, a
file with other hard links, or one still open for writing somewhere (a read lease cannot be
taken) refuses the image (``bad-archive``, naming the entry).  Files become root 0400 and are
hashed; the credentials in the CRIU files must be the account's (``wrong-credentials``);
manifest and signature are written; the quota is checked (``quota-exceeded``) and the
directory is renamed into the store.  Any refusal deletes the dump.

Blocking work runs in worker threads; the quota check and the rename into the store happen
under one lock, so concurrent commits and imports cannot overrun a quota together.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..ams import LocalAccount
from .imagefs import (
    CREATE_FLAGS,
    copy_file,
    open_dir,
    prune,
    read_capped,
    remove,
    root_dir,
    take_dump,
    write_new,
)
from .imageverify import (
    check_account,
    check_creds,
    check_listing,
    check_owner,
    fill_restore_dir,
    receive_signed_archive,
    verified,
    write_archive,
)
from .manifest import (
    ID_RE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    ImageError,
    Manifest,
    NodeKey,
    Owner,
    load_or_create_node_key,
    load_trusted_keys,
    parse_manifest,
    sign,
)

__all__ = ['DEFAULT_QUOTA_BYTES', 'DEFAULT_QUOTA_COUNT', 'ImageError', 'ImageInfo', 'ImageStore',
           'Owner']

log = logging.getLogger(__name__)

DEFAULT_QUOTA_BYTES = 10 << 30
DEFAULT_QUOTA_COUNT = 20
#: Restore directories, exports and staging directories older than this are pruned.
TEMP_TTL = 6 * 3600.0


@dataclass(frozen=True)
class ImageInfo:
    """One stored image.  ``id`` is the local id; ``origin_id`` the id it was taken under
    (different after an import); ``node`` where it was taken; ``signed_by`` the fingerprint of
    the node key that signed it; ``size_bytes``/``file_count``: the CRIU files."""

    id: str
    uid: int
    owner: Owner
    command: tuple[str, ...]
    job_id: str | None
    node: str
    created: float
    criu_version: str
    size_bytes: int
    file_count: int
    signed_by: str
    origin_id: str = ''

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form for listings (``--json``)."""
        d = dict(self.__dict__)
        d['owner'] = {'vo': self.owner.vo, 'user': self.owner.user}
        d['command'] = list(self.command)
        return d


def _info(image_id: str, m: Manifest) -> ImageInfo:
    return ImageInfo(id=image_id, uid=m.uid, owner=m.owner, command=m.command, job_id=m.job_id,
                     node=m.node, created=m.created, criu_version=m.criu_version,
                     size_bytes=m.size_bytes, file_count=len(m.files), signed_by=m.signer,
                     origin_id=m.id)


# -- the store ------------------------------------------------------------------------------

class ImageStore:
    """The node's image store under ``STATE`` (see the module docstring).

    Make it with :meth:`open`.  All operations are coroutines; ``uid``-keyed ones see only
    that account's images, so another account's image is ``no-such-image``.
    """

    def __init__(self, state_dir: Path, *, node_name: str, node_key: NodeKey,
                 trusted: Mapping[str, Ed25519PublicKey], quota_bytes: int,
                 quota_count: int) -> None:
        self.state_dir = state_dir
        self.node_name = node_name
        self.node_key = node_key
        self.trusted = {**trusted, node_key.fingerprint: node_key.public}
        self.quota_bytes = quota_bytes
        self.quota_count = quota_count
        self.images_dir = state_dir / 'images'
        self.restore_root = state_dir / 'cr-restore'
        self.export_root = state_dir / 'cr-export'
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path | str, *, node_name: str,
             trusted_keys: Sequence[Path | str] = (), quota_bytes: int = DEFAULT_QUOTA_BYTES,
             quota_count: int = DEFAULT_QUOTA_COUNT) -> ImageStore:
        """Open (creating its directories and, on first use, the node key) the store.

        *trusted_keys*: other nodes' ``image_key.pub`` files (or their OpenSSH lines); this
        node's own key is always trusted.  ValueError for an unreadable or wrong key.  The
        result may also be awaited (``await ImageStore.open(...)``).
        """
        if quota_bytes <= 0 or quota_count <= 0:
            raise ValueError('image quotas must be positive')
        state = Path(state_dir)
        state.mkdir(mode=0o755, parents=True, exist_ok=True)
        key = load_or_create_node_key(state, node_name)
        store = cls(state, node_name=node_name, node_key=key,
                    trusted=load_trusted_keys(trusted_keys), quota_bytes=quota_bytes,
                    quota_count=quota_count)
        sfd = open_dir(str(state))
        try:
            for name, mode in (('images', 0o711), ('cr-restore', 0o711), ('cr-export', 0o700)):
                fd = root_dir(sfd, name, mode)
                try:
                    if name == 'images':
                        os.close(root_dir(fd, '.staging', 0o700))
                    store._prune_tree(fd, name)
                finally:
                    os.close(fd)
        finally:
            os.close(sfd)
        return store

    def __await__(self) -> Generator[Any, None, ImageStore]:
        """``await ImageStore.open(...)`` works as well as the plain call."""
        return self
        yield  # pragma: no cover (makes this a generator)

    @property
    def fingerprint(self) -> str:
        """This node's image key fingerprint (``SHA256:...``)."""
        return self.node_key.fingerprint

    @property
    def public_key_line(self) -> str:
        """This node's image key as an OpenSSH line (what other nodes list as trusted)."""
        return self.node_key.public_line

    def _prune_tree(self, fd: int, name: str) -> None:
        if name == 'images':
            sub = open_dir('.staging', fd)
            try:
                prune(sub, TEMP_TTL)
            finally:
                os.close(sub)
            return
        for uid_dir in os.listdir(fd):
            try:
                sub = open_dir(uid_dir, fd)
            except OSError:
                remove(fd, uid_dir)
                continue
            try:
                prune(sub, TEMP_TTL)
            finally:
                os.close(sub)

    # -- helpers ------------------------------------------------------------------------

    def _uid_fd(self, uid: int, create: bool) -> int | None:
        """The fd of ``images/<uid>/`` (None if it does not exist and *create* is false)."""
        root = open_dir(str(self.images_dir))
        try:
            if create:
                return root_dir(root, str(uid), 0o711)
            try:
                return open_dir(str(uid), root)
            except FileNotFoundError:
                return None
        finally:
            os.close(root)

    def _image_fd(self, uid: int, image_id: str) -> int:
        if not isinstance(image_id, str) or not ID_RE.match(image_id):
            raise ImageError('no-such-image', f'no image {image_id!r}')
        ufd = self._uid_fd(uid, create=False)
        try:
            if ufd is None:
                raise FileNotFoundError
            return open_dir(image_id, ufd)
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError('no-such-image', f'no image {image_id}') from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ImageError('no-such-image', f'no image {image_id}') from None
            raise
        finally:
            if ufd is not None:
                os.close(ufd)

    def _usage(self, uid: int) -> tuple[int, int]:
        infos = self._list_sync(uid)
        return sum(i.size_bytes for i in infos), len(infos)

    def _check_quota(self, uid: int, add_bytes: int) -> None:
        used, count = self._usage(uid)
        if used + add_bytes > self.quota_bytes or count + 1 > self.quota_count:
            raise self._quota_error(uid, used, count, add_bytes)

    def _quota_error(self, uid: int, used: int, count: int, add_bytes: int | None) -> ImageError:
        what = 'another image' if add_bytes is None else f'this image ({add_bytes} bytes)'
        total = used + (add_bytes or 0)
        return ImageError('quota-exceeded', f'image quota exceeded for uid {uid}: {what} would '
                          f'make {count + 1} images of {self.quota_count} allowed and {total} '
                          f'bytes of {self.quota_bytes} allowed')

    @staticmethod
    def _new_id(ufd: int, wanted: str | None = None) -> str:
        if wanted and ID_RE.match(wanted):
            try:
                os.stat(wanted, dir_fd=ufd, follow_symlinks=False)
            except FileNotFoundError:
                return wanted
        while True:
            image_id = 'i' + secrets.token_hex(8)
            try:
                os.stat(image_id, dir_fd=ufd, follow_symlinks=False)
            except FileNotFoundError:
                return image_id

    def _publish(self, src_fd: int, src_name: str, uid: int,
                 manifest_for: Callable[[int], tuple[str, Manifest, bytes, bytes]]) -> ImageInfo:
        """Under the store lock: ``manifest_for(fd of images/<uid>)`` picks the id and gives
        (id, manifest, its bytes, signature); check the quota, write manifest and signature
        into ``src_fd/src_name`` and rename that to ``images/<uid>/<id>``."""
        with self._lock:
            ufd = self._uid_fd(uid, create=True)
            assert ufd is not None
            try:
                image_id, manifest, mbytes, sig = manifest_for(ufd)
                self._check_quota(uid, manifest.size_bytes)
                dfd = open_dir(src_name, src_fd)
                try:
                    write_new(dfd, MANIFEST, mbytes)
                    write_new(dfd, SIGNATURE, sig)
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                os.rename(src_name, image_id, src_dir_fd=src_fd, dst_dir_fd=ufd)
                os.fsync(ufd)
            finally:
                os.close(ufd)
        return _info(image_id, manifest)

    # -- commit ---------------------------------------------------------------------------

    def _commit_sync(self, spool_dir: str, account: LocalAccount, owner: Owner,
                     job_id: str | None, command: Sequence[str], criu_version: str) -> ImageInfo:
        check_account(account)
        parent, leaf = os.path.split(os.path.abspath(spool_dir))
        try:
            pfd = open_dir(parent)
        except OSError as exc:
            raise ImageError('bad-archive', f'{parent}: {exc.strerror}') from None
        try:
            pst = os.fstat(pfd)
            if pst.st_uid != 0 or pst.st_mode & 0o022:
                raise ImageError('bad-archive', f'{parent} must be a root-owned directory '
                                 'not writable by others')
            try:
                dfd = open_dir(leaf, pfd)
            except FileNotFoundError:
                raise ImageError('bad-archive', f'no dump at {spool_dir}') from None
            except OSError as exc:
                remove(pfd, leaf)
                raise ImageError('bad-archive', f'{spool_dir} is not a directory '
                                 f'({exc.strerror})') from None
            try:
                st = os.fstat(dfd)
                if st.st_uid not in (account.uid, 0):
                    raise ImageError('bad-archive', f'{spool_dir} belongs to uid {st.st_uid}, '
                                     f'not {account.name}')
                try:
                    return self._commit_dir(pfd, leaf, dfd, account, owner, job_id, command,
                                            criu_version)
                except BaseException:
                    remove(pfd, leaf)
                    raise
            finally:
                os.close(dfd)
        finally:
            os.close(pfd)

    def _commit_dir(self, pfd: int, leaf: str, dfd: int, account: LocalAccount, owner: Owner,
                    job_id: str | None, command: Sequence[str], criu_version: str) -> ImageInfo:
        files = take_dump(dfd, account)
        names = sorted(files)
        check_creds(dfd, names, account)

        def manifest_for(ufd: int) -> tuple[str, Manifest, bytes, bytes]:
            image_id = self._new_id(ufd, leaf)
            m = Manifest(id=image_id, owner=owner, uid=account.uid, gid=account.gid,
                         command=tuple(command), job_id=job_id, node=self.node_name,
                         created=time.time(), criu_version=criu_version,
                         signer=self.node_key.fingerprint, files=files)
            mbytes = m.to_bytes()
            return image_id, m, mbytes, sign(self.node_key, mbytes)

        try:
            return self._publish(pfd, leaf, account.uid, manifest_for)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # The spool is on another filesystem: copy into the store's staging area first.
        parent, name = self._staging()
        try:
            sfd = open_dir(name, parent)
            try:
                for fname in names:
                    if copy_file(dfd, sfd, fname) != (files[fname].size, files[fname].sha256):
                        raise ImageError('tampered', f'{fname} changed while copied')
            finally:
                os.close(sfd)
            info = self._publish(parent, name, account.uid, manifest_for)
        except BaseException:
            remove(parent, name)
            raise
        finally:
            os.close(parent)
        remove(pfd, leaf)
        return info

    def _staging(self) -> tuple[int, str]:
        """A fresh root 0700 directory in ``images/.staging``: (its parent's fd, its name)."""
        parent = open_dir(str(self.images_dir / '.staging'))
        name = secrets.token_hex(8)
        os.mkdir(name, 0o700, dir_fd=parent)
        return parent, name

    # -- import ---------------------------------------------------------------------------

    def _import_sync(self, account: LocalAccount, owner: Owner, fileobj: BinaryIO,
                     charge: Callable[[int], None] | None = None) -> ImageInfo:
        check_account(account)
        used, count = self._usage(account.uid)
        if count + 1 > self.quota_count or used >= self.quota_bytes:
            raise self._quota_error(account.uid, used, count, None)
        remaining = self.quota_bytes - used
        parent, name = self._staging()
        try:
            sfd = open_dir(name, parent)
            try:
                manifest, meta = receive_signed_archive(
                    sfd, fileobj, self.trusted, account, owner, remaining,
                    lambda total: self._quota_error(account.uid, used, count, total),
                    charge=charge)
                os.fsync(sfd)
            finally:
                os.close(sfd)

            def manifest_for(ufd: int) -> tuple[str, Manifest, bytes, bytes]:
                return self._new_id(ufd), manifest, meta[MANIFEST], meta[SIGNATURE]

            return self._publish(parent, name, account.uid, manifest_for)
        except BaseException:
            remove(parent, name)
            raise
        finally:
            os.close(parent)

    # -- restore / export -----------------------------------------------------------------

    def _restore_dir_sync(self, account: LocalAccount, owner: Owner, image_id: str) -> str:
        check_account(account)
        ifd = self._image_fd(account.uid, image_id)
        try:
            manifest, _, _ = verified(ifd, self.trusted)
            check_owner(manifest, owner, f'image {image_id}')
            check_listing(ifd, manifest)
            rootfd = open_dir(str(self.restore_root))
            try:
                ufd = root_dir(rootfd, str(account.uid), 0o711)
            finally:
                os.close(rootfd)
            try:
                prune(ufd, TEMP_TTL)
                name = f'{image_id}-{secrets.token_hex(6)}'
                os.mkdir(name, 0o700, dir_fd=ufd)
                try:
                    fill_restore_dir(ifd, ufd, name, manifest, account)
                except BaseException:
                    remove(ufd, name)
                    raise
            finally:
                os.close(ufd)
        finally:
            os.close(ifd)
        return str(self.restore_root / str(account.uid) / name)

    def _export_sync(self, uid: int, image_id: str) -> Path:
        ifd = self._image_fd(uid, image_id)
        try:
            manifest, mbytes, sig = verified(ifd, self.trusted)
            assert sig is not None
            check_listing(ifd, manifest)
            rootfd = open_dir(str(self.export_root))
            try:
                efd = root_dir(rootfd, str(uid), 0o700)
            finally:
                os.close(rootfd)
            try:
                prune(efd, TEMP_TTL)
                name = f'{image_id}-{secrets.token_hex(6)}.tar'
                fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=efd)
                try:
                    with os.fdopen(fd, 'wb') as out:
                        write_archive(out, ifd, manifest, mbytes, sig)
                        out.flush()
                        os.fsync(out.fileno())
                except BaseException:
                    remove(efd, name)
                    raise
            finally:
                os.close(efd)
        finally:
            os.close(ifd)
        return self.export_root / str(uid) / name

    # -- listing / removal ----------------------------------------------------------------

    def _read_info(self, ufd: int, image_id: str) -> ImageInfo:
        """The image's info from its manifest, parsed but not re-verified (so that an image
        whose signer is no longer trusted can still be listed and removed)."""
        ifd = open_dir(image_id, ufd)
        try:
            mbytes = read_capped(ifd, MANIFEST, MAX_MANIFEST_BYTES)
            if mbytes is None:
                raise ImageError('tampered', f'image {image_id} has no {MANIFEST}')
            return _info(image_id, parse_manifest(mbytes))
        finally:
            os.close(ifd)

    def _list_sync(self, uid: int) -> list[ImageInfo]:
        ufd = self._uid_fd(uid, create=False)
        if ufd is None:
            return []
        infos = []
        try:
            for name in os.listdir(ufd):
                if not ID_RE.match(name):
                    continue
                try:
                    infos.append(self._read_info(ufd, name))
                except (ImageError, OSError) as exc:
                    log.warning('image %s of uid %d is unreadable: %s', name, uid, exc)
        finally:
            os.close(ufd)
        return sorted(infos, key=lambda i: (i.created, i.id))

    def _get_sync(self, uid: int, image_id: str) -> ImageInfo:
        os.close(self._image_fd(uid, image_id))  # no-such-image unless it is there
        ufd = self._uid_fd(uid, create=False)
        assert ufd is not None
        try:
            return self._read_info(ufd, image_id)
        except FileNotFoundError:
            raise ImageError('no-such-image', f'no image {image_id}') from None
        finally:
            os.close(ufd)

    def _remove_sync(self, uid: int, image_id: str) -> None:
        os.close(self._image_fd(uid, image_id))  # no-such-image unless it is there
        ufd = self._uid_fd(uid, create=False)
        assert ufd is not None
        parent = open_dir(str(self.images_dir / '.staging'))
        name = 'rm-' + secrets.token_hex(8)
        try:
            with self._lock:  # out of sight at once (never listed half-deleted), then deleted
                os.rename(image_id, name, src_dir_fd=ufd, dst_dir_fd=parent)
            remove(parent, name)
        except FileNotFoundError:
            raise ImageError('no-such-image', f'no image {image_id}') from None
        finally:
            os.close(parent)
            os.close(ufd)

    # -- the contract's coroutines --------------------------------------------------------

    async def commit(self, spool_dir: str, account: LocalAccount, owner: Owner,
                     job_id: str | None, command: Sequence[str], criu_version: str) -> ImageInfo:
        """Take over a finished dump written by CRIU as *account* (see the module docstring);
        its id is the spool directory's name when that is free.  Any refusal deletes it."""
        return await asyncio.to_thread(self._commit_sync, spool_dir, account, owner, job_id,
                                       command, criu_version)

    async def list(self, uid: int) -> list[ImageInfo]:
        """The account's images, oldest first (manifests read, not re-verified)."""
        return await asyncio.to_thread(self._list_sync, uid)

    async def get(self, uid: int, image_id: str) -> ImageInfo:
        """One image of the account (its manifest; verified at restore, export and import);
        ``no-such-image`` otherwise."""
        return await asyncio.to_thread(self._get_sync, uid, image_id)

    async def remove(self, uid: int, image_id: str) -> None:
        """Delete one image of the account; ``no-such-image`` otherwise."""
        await asyncio.to_thread(self._remove_sync, uid, image_id)

    async def usage(self, uid: int) -> tuple[int, int]:
        """(bytes, images) the account's images use against its quota."""
        return await asyncio.to_thread(self._usage, uid)

    async def export_archive(self, uid: int, image_id: str) -> Path:
        """One tar of the image (``manifest.json``, ``manifest.sig``, the files by name),
        root 0600 under ``STATE/cr-export/<uid>/``; hashes re-checked while written.  The
        caller sends it and unlinks it (leftovers are pruned after :data:`TEMP_TTL`)."""
        return await asyncio.to_thread(self._export_sync, uid, image_id)

    async def import_archive(self, account: LocalAccount, owner: Owner,
                             fileobj: BinaryIO, *,
                             charge: Callable[[int], None] | None = None) -> ImageInfo:
        """Verify and store an archive from anywhere (hostile input, see imagetar.py).

        *fileobj*: a binary file object with a blocking ``read(n)``, read in a worker
        thread.  Checks, in order: archive form (``bad-archive``), signature
        (``bad-signature``/``untrusted-node``), files and hashes (``tampered``), owner
        (``not-owner``), credentials in the CRIU files (``wrong-credentials``), quota
        (``quota-exceeded``).  The image keeps its signature and original id; it gets a
        new local id.  Nothing is left behind on refusal.  *charge(size)* is told each file's
        size before it is staged and may refuse it (a migration's staged bytes, see
        ``migimage.MigrationLedger``).
        """
        return await asyncio.to_thread(self._import_sync, account, owner, fileobj, charge)

    async def restore_dir(self, account: LocalAccount, owner: Owner, image_id: str) -> str:
        """Re-verify the image (signature, listing, hashes, owner, credentials) and return a
        fresh directory that *account*'s CRIU can read and nobody can write."""
        return await asyncio.to_thread(self._restore_dir_sync, account, owner, image_id)

    async def release_restore_dir(self, path: str | Path) -> None:
        """Remove a directory :meth:`restore_dir` made, once the restore is over (optional:
        leftovers are pruned after :data:`TEMP_TTL`)."""
        await asyncio.to_thread(self._release, Path(path), self.restore_root)

    async def release_export(self, path: str | Path) -> None:
        """Remove an archive :meth:`export_archive` made, once it is sent (optional, as
        above)."""
        await asyncio.to_thread(self._release, Path(path), self.export_root)

    @staticmethod
    def _release(path: Path, root: Path) -> None:
        path = Path(os.path.abspath(path))
        if path.parent.parent != root:
            raise ValueError(f'{path} was not made by this image store')
        pfd = open_dir(str(path.parent))
        try:
            remove(pfd, path.name)
        finally:
            os.close(pfd)
