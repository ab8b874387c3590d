"""Verifying an image directory, and what is made from a verified one (restore dir, archive).

Every use of an image goes through these checks, whatever stored it (design: "an unverified
image is a root exploit"); the store is root-owned, so they are cheap insurance there and the
real gate for an import:

* :func:`verified`: ``manifest.json`` is signed by a trusted node key (``bad-signature``,
  ``untrusted-node``) and well-formed (``bad-archive``);
* :func:`check_listing`: the directory holds exactly the manifest's files, regular and
  root-owned (``tampered``);
* :func:`check_hashes`: every file has the manifest's size and sha256 (``tampered``);
* :func:`check_creds`: the CRIU files give every live thread exactly the account's uid, gid,
  groups and no capability (``wrong-credentials``, see :mod:`xos_sshd.cr.imagecreds`).

:func:`fill_restore_dir` hard-links (or copies) a verified image into a fresh directory,
verifies *that* (the very inodes CRIU will read) and only then lets the account read it;
:func:`write_archive` writes the export tar, checking each file's hash as it streams.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..ams import LocalAccount
from . import imagecreds
from .imagefs import (
    CREATE_FLAGS,
    READ_FLAGS,
    FileSink,
    HashingReader,
    MemorySink,
    copy_file,
    grant_read,
    hash_fd,
    kind,
    open_dir,
    read_capped,
)
from .imagetar import member_info, open_writer, read_archive
from .manifest import (
    MANIFEST,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    ImageError,
    Manifest,
    Owner,
    verify,
)


def check_account(account: LocalAccount) -> None:
    """Root's images are never kept or restored, whatever else holds."""
    if account.uid == 0 or account.gid == 0:
        raise ImageError('wrong-credentials', f'images of uid {account.uid}/gid '
                         f'{account.gid} are never kept or restored')


def check_owner(manifest: Manifest, owner: Owner, image: str = 'the image') -> None:
    if manifest.owner != owner:
        raise ImageError('not-owner', f'{image} belongs to {manifest.owner.user} of VO '
                         f'{manifest.owner.vo}, not {owner.user} of {owner.vo}')


def verified(ifd: int, trusted: Mapping[str, Ed25519PublicKey]
             ) -> tuple[Manifest, bytes, bytes | None]:
    """(manifest, its bytes, signature bytes) of an open image directory, the signature
    checked against the *trusted* node keys."""
    mbytes = read_capped(ifd, MANIFEST, MAX_MANIFEST_BYTES)
    if mbytes is None:
        raise ImageError('tampered', f'the image has no {MANIFEST}')
    sig = read_capped(ifd, SIGNATURE, MAX_SIGNATURE_BYTES)
    return verify(trusted, mbytes, sig), mbytes, sig


def check_listing(ifd: int, manifest: Manifest) -> None:
    """The directory holds exactly the manifest's files (+ manifest, signature), all regular
    and root-owned."""
    expected = set(manifest.files) | {MANIFEST, SIGNATURE}
    present = set(os.listdir(ifd))
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise ImageError('tampered', f'image files differ from the manifest: extra '
                         f'{extra[:10]}, missing {missing[:10]}')
    for name in present:
        st = os.stat(name, dir_fd=ifd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise ImageError('tampered', f'{name} is {kind(st.st_mode)} or not root-owned')


def check_hashes(dir_fd: int, files: Mapping[str, tuple[int, str]] | None,
                 manifest: Manifest) -> None:
    """Every file's size and sha256 as the manifest says.  *files*: (size, digest) already
    known (an import hashes while writing); None to read the files from *dir_fd*."""
    if files is not None and set(files) != set(manifest.files):
        extra = sorted(set(files) - set(manifest.files))
        missing = sorted(set(manifest.files) - set(files))
        raise ImageError('tampered', f'archive files differ from the manifest: extra '
                         f'{extra[:10]}, missing {missing[:10]}')
    for name, entry in sorted(manifest.files.items()):
        if files is not None:
            got = files[name]
        else:
            try:
                fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                raise ImageError('tampered', f'{name}: {exc.strerror}') from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ImageError('tampered', f'{name} is not a regular file')
                got = hash_fd(fd)
            finally:
                os.close(fd)
        if got != (entry.size, entry.sha256):
            raise ImageError('tampered', f'{name} does not match the manifest (size {got[0]}, '
                             f'expected {entry.size}, or its sha256 differs)')


def check_creds(dir_fd: int, names: Sequence[str], account: LocalAccount,
                manifest: Manifest | None = None) -> None:
    """The CRIU files give every live thread exactly the account's credentials (and the
    manifest, if given, names the account's uid and gid)."""
    try:
        creds = imagecreds.image_credentials(dir_fd, names)
    except (imagecreds.CredsFormatError, OSError) as exc:
        raise ImageError('wrong-credentials', f'cannot read the credentials in the image: '
                         f'{exc}') from None
    problem = imagecreds.credentials_problem(creds, account.uid, account.gid, account.gids)
    if problem:
        raise ImageError('wrong-credentials', f'the image would run as another user: '
                         f'{problem}; {account.name} is uid {account.uid} gid {account.gid}')
    if manifest is not None and (manifest.uid, manifest.gid) != (account.uid, account.gid):
        raise ImageError('wrong-credentials', f'the image was made for uid {manifest.uid} '
                         f'gid {manifest.gid}; {account.name} is uid {account.uid}')


def fill_restore_dir(ifd: int, parent_fd: int, name: str, manifest: Manifest,
                     account: LocalAccount) -> None:
    """Populate the new root 0700 directory *name* with the image's files, verify them there,
    then give *account* (only) read access."""
    rfd = open_dir(name, parent_fd)
    try:
        names = sorted(manifest.files)
        for fname in names:
            try:  # a hard link: no copy, and the very inode that gets verified next
                os.link(fname, fname, src_dir_fd=ifd, dst_dir_fd=rfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                    raise
                copy_file(ifd, rfd, fname)
        check_hashes(rfd, None, manifest)
        check_creds(rfd, names, account, manifest)
        grant_read(rfd, names, account)
    finally:
        os.close(rfd)


def write_archive(out: BinaryIO, ifd: int, manifest: Manifest, mbytes: bytes,
                  sig: bytes) -> None:
    """The export tar of a verified image directory: manifest, signature, files by name."""
    with open_writer(out) as tar:
        for meta_name, data in ((MANIFEST, mbytes), (SIGNATURE, sig)):
            tar.addfile(member_info(meta_name, len(data), manifest.created), io.BytesIO(data))
        for fname, entry in sorted(manifest.files.items()):
            fd = os.open(fname, READ_FLAGS, dir_fd=ifd)
            try:
                if os.fstat(fd).st_size != entry.size:
                    raise ImageError('tampered', f'{fname} does not match the manifest (size)')
                reader = HashingReader(fd)
                tar.addfile(member_info(fname, entry.size, manifest.created), reader)
                if reader.pos != entry.size or reader.hash.hexdigest() != entry.sha256:
                    raise ImageError('tampered', f'{fname} does not match the manifest')
            finally:
                os.close(fd)


def receive_signed_archive(sfd: int, src: BinaryIO, trusted: Sequence[Ed25519PublicKey],
                           account: LocalAccount, owner: Owner, budget: int,
                           over_budget: Callable[[int], ImageError],
                           charge: Callable[[int], None] | None = None,
                           ) -> tuple[Manifest, dict[str, bytes]]:
    """Read a signed image archive from *src* (hostile) into the empty staging directory
    *sfd* and verify it: signature by a trusted node, every file's hash, the owner, the
    credentials inside the CRIU images.  At most *budget* bytes of files (else
    ``over_budget(bytes)`` is raised); *charge(size)*, if given, is told each file's size
    before it is written and may refuse it by raising (a migration's staged bytes are
    charged to the account across all its streams).  Returns the manifest and the raw
    manifest/signature bytes.  The one way an import and a migration's signed part are
    taken in."""
    meta: dict[str, bytes] = {}
    hashes: dict[str, tuple[int, str]] = {}
    data_bytes = 0

    def open_member(member: str, size: int) -> FileSink | MemorySink:
        nonlocal data_bytes
        if member in (MANIFEST, SIGNATURE):
            cap = MAX_MANIFEST_BYTES if member == MANIFEST else MAX_SIGNATURE_BYTES
            if size > cap:
                raise ImageError('bad-archive', f'{member} declares {size} bytes (at most {cap})')
            return MemorySink(member, meta)
        data_bytes += size
        if data_bytes > budget:
            raise over_budget(data_bytes)
        if charge is not None:
            charge(size)
        return FileSink(os.open(member, CREATE_FLAGS, 0o400, dir_fd=sfd), member, hashes)

    read_archive(src, open_member, max_members=MAX_FILES + 2,
                 max_bytes=budget + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES,
                 oversize=lambda _, total: over_budget(total))
    if MANIFEST not in meta:
        raise ImageError('bad-archive', f'the archive has no {MANIFEST}')
    manifest = verify(trusted, meta[MANIFEST], meta.get(SIGNATURE))
    check_hashes(sfd, hashes, manifest)
    check_owner(manifest, owner)
    check_creds(sfd, sorted(hashes), account, manifest)
    return manifest, meta
