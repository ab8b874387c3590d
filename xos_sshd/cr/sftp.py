"""``xos-images``: an SFTP view of the caller's images, and an upload area, nothing else.

The namespace is virtual; no path a client names is ever looked up on the gateway's
filesystem (asyncssh's default :class:`asyncssh.SFTPServer` methods work on the local
filesystem as root: every one of them is overridden here, the unknown ones refuse)::

    /                   directory: the caller's images and ``upload``
    /<image-id>.tar     each image of the caller as one archive, read-only
                        (``ImageStore.export_archive``; the image store's own file)
    /upload/            write-only area: ``/upload/NAME.tar`` (NAME: letters, digits, ``._-``)
                        is written into a root-owned spool file; when the client closes it,
                        the archive is imported (``ImageStore.import_archive``: signature,
                        owner, hashes, credentials, quota) and the spool file deleted.  A
                        refused import fails the close with the reason; the result is kept
                        for ``xos-cr``'s ``imported`` op either way.

Anything else does not exist (reads) or is refused with permission denied (writes, renames,
links, removals, attribute changes).

Uploads are bounded: :data:`MAX_UPLOAD` bytes each, :data:`MAX_OPEN_UPLOADS` at once per
session, and every byte an upload puts in its spool file is charged to the account in the
gateway's ledger of incoming bytes (``CRService.migrations``, :class:`migimage.MigrationLedger`)
before it is written, with its other uploads and its incoming migrations: all of them plus
what its images use may not pass its byte quota (``quota-exceeded``, naming the numbers).
A refused write ends the upload at once (spool file emptied and removed, charge released);
the charge is released too when the upload is imported (its bytes are then the account's
image: the import's working copy in the store is the same bytes, not charged twice), when
its import is refused, and when the session ends with it still open (abandoned: nothing is
imported).
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import secrets
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPFailure,
    SFTPName,
    SFTPNoSuchFile,
    SFTPOpUnsupported,
    SFTPPermissionDenied,
)

from ..control.protocol import one_line
from .images import ImageError
from .migimage import UPLOAD as LEDGER_UPLOAD
from .service import IMAGE_ID, UPLOAD_NAME, Caller, CRService

log = logging.getLogger(__name__)

MAX_UPLOAD = 64 << 30
MAX_OPEN_UPLOADS = 4
UPLOAD = 'upload'
_WRITE_FLAGS = FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC | FXF_EXCL


class _Download:
    def __init__(self, image_id: str, path: Any, fd: int) -> None:
        self.image_id, self.path, self.fd = image_id, path, fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """For asyncssh's sparse-ranges extension, which seeks file objects itself."""
        return os.lseek(self.fd, offset, whence)


class _Upload:
    def __init__(self, name: str, path: Path, fd: int, token: int) -> None:
        self.name, self.path, self.fd = name, path, fd
        self.token = token  # its entry in the service's ledger; 0 once released
        self.size = 0
        self.closed = False
        self.failed = ''  # a write was refused: the close reports it, imports nothing
        self.writing = 0  # writes running in a worker thread: the fd outlives them

    def shut(self) -> None:
        """No more writes: the fd is closed now, or when the last write running ends (never
        under a worker thread's feet: the number could be reused by another open)."""
        self.closed = True
        if not self.writing and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Refused(Exception):
    """An upload refused while it was written (``REASON: message``)."""

    def __init__(self, text: str) -> None:
        reason, _, message = text.partition(': ')
        super().__init__(message)
        self.reason = reason


def _dir_attrs(mode: int, mtime: float) -> SFTPAttrs:
    return SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, permissions=stat.S_IFDIR | mode,
                     uid=0, gid=0, size=0, atime=int(mtime), mtime=int(mtime), nlink=2)


def _file_attrs(size: int, mode: int, mtime: float, uid: int = 0) -> SFTPAttrs:
    return SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, permissions=stat.S_IFREG | mode,
                     uid=uid, gid=0, size=size, atime=int(mtime), mtime=int(mtime), nlink=1)


class ImagesSFTPServer(asyncssh.SFTPServer):
    """One SFTP session of ``xos-images`` for *caller*."""

    def __init__(self, chan: Any, service: CRService, caller: Caller, upload_dir: Path) -> None:
        super().__init__(chan)
        self._service = service
        self._caller = caller
        self._upload_dir = Path(upload_dir)
        self._uploads: dict[str, _Upload] = {}
        #: Archives exported in this session (stat then open of one image: one export).
        self._exports: dict[str, Path] = {}
        #: Releases what the session still holds once its channel is closed, whatever
        #: asyncssh's own clean-up did (see _when_closed).
        self._watch: asyncio.Future[None] | None = None
        self._started = time.time()

    # --- names ------------------------------------------------------------------------------

    @staticmethod
    def _where(path: bytes) -> tuple[str, str]:
        """``(kind, name)``: ``root``, ``uploads``, ``image`` (id), ``upload`` (name), ``none``."""
        try:
            text = path.decode('utf-8')
        except UnicodeDecodeError:
            return 'none', ''
        norm = posixpath.normpath('/' + text)
        if norm in ('/', '//'):
            return 'root', ''
        parts = norm.strip('/').split('/')
        if parts == [UPLOAD]:
            return 'uploads', ''
        if len(parts) == 1 and parts[0].endswith('.tar') and IMAGE_ID.match(parts[0][:-4]):
            return 'image', parts[0][:-4]
        if len(parts) == 2 and parts[0] == UPLOAD and UPLOAD_NAME.match(parts[1]):
            return 'upload', parts[1]
        return 'none', ''

    def format_user(self, uid: int | None) -> str:
        return self._caller.account.name if uid == self._caller.account.uid else 'root'

    def format_group(self, gid: int | None) -> str:
        return 'root'

    def map_path(self, path: bytes) -> bytes:  # never used for a local lookup here
        return path

    def reverse_map_path(self, path: bytes) -> bytes:
        return path

    def realpath(self, path: bytes) -> bytes:
        try:
            text = path.decode('utf-8')
        except UnicodeDecodeError:
            raise SFTPNoSuchFile('no such file') from None
        return posixpath.normpath('/' + text).replace('//', '/').encode()

    # --- reading ----------------------------------------------------------------------------

    async def _images(self) -> list[Any]:
        infos = await self._service.images.list(self._caller.account.uid)
        return [i for i in infos if i.owner == self._caller.owner]

    async def _export(self, image_id: str) -> Path:
        self._watch_channel()
        path = self._exports.get(image_id)
        if path is None or not path.exists():
            path = self._exports[image_id] = Path(await self._call(
                self._service.export_archive(self._caller, image_id)))
        return path

    async def _call(self, coro: Any) -> Any:
        """Run a service call; its refusals become SFTP errors with the reason."""
        from .jobs import JobError
        from .service import CRError
        try:
            return await coro
        except (ImageError, JobError, CRError) as exc:
            if exc.reason in ('no-such-image', 'no-such-job'):
                raise SFTPNoSuchFile(one_line(exc)) from None
            raise SFTPFailure(f'{exc.reason}: {one_line(exc)}') from None

    async def stat(self, path: bytes) -> SFTPAttrs:
        kind, name = self._where(path)
        if kind == 'root':
            return _dir_attrs(0o555, self._started)
        if kind == 'uploads':
            return _dir_attrs(0o300, self._started)
        if kind == 'image':
            info = await self._info(name)
            exported = await self._export(info.id)
            return _file_attrs(os.stat(exported).st_size, 0o444, info.created)
        if kind == 'upload' and name in self._uploads:
            return _file_attrs(self._uploads[name].size, 0o200, time.time(),
                               self._caller.account.uid)
        raise SFTPNoSuchFile('no such file')

    lstat = stat

    async def _info(self, image_id: str) -> Any:
        for info in await self._images():
            if info.id == image_id:
                return info
        raise SFTPNoSuchFile('no such image')

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        kind, _ = self._where(path)
        if kind == 'root':
            yield SFTPName(b'.', attrs=_dir_attrs(0o555, self._started))
            yield SFTPName(b'..', attrs=_dir_attrs(0o555, self._started))
            yield SFTPName(UPLOAD.encode(), attrs=_dir_attrs(0o300, self._started))
            for info in await self._images():
                # The archive's exact size is known once exported; the listing gives the
                # image's size (manifest files), which the archive exceeds by its headers.
                yield SFTPName(f'{info.id}.tar'.encode(),
                               attrs=_file_attrs(info.size_bytes, 0o444, info.created))
        elif kind == 'uploads':
            yield SFTPName(b'.', attrs=_dir_attrs(0o300, self._started))
            yield SFTPName(b'..', attrs=_dir_attrs(0o555, self._started))
            for up in self._uploads.values():
                yield SFTPName(up.name.encode(), attrs=_file_attrs(
                    up.size, 0o200, time.time(), self._caller.account.uid))
        else:
            raise SFTPNoSuchFile('no such directory')

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        kind, name = self._where(path)
        writing = bool(pflags & _WRITE_FLAGS)
        if kind == 'image':
            if writing:
                raise SFTPPermissionDenied('images are read-only: upload into /upload/NAME.tar')
            info = await self._info(name)
            exported = await self._export(info.id)
            return _Download(info.id, exported,
                             os.open(exported, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
        if kind == 'upload':
            if not pflags & FXF_WRITE or pflags & FXF_READ:
                raise SFTPPermissionDenied('the upload area is write-only')
            return await self._new_upload(name)
        if writing:
            raise SFTPPermissionDenied('only /upload/NAME.tar (NAME: letters, digits, ._-) '
                                       'can be written')
        if kind in ('root', 'uploads'):
            raise SFTPFailure('is a directory')
        raise SFTPNoSuchFile('no such file')

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> object:
        raise SFTPOpUnsupported('SFTP version 3 only')

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if not isinstance(file_obj, _Download):
            raise SFTPPermissionDenied('the upload area is write-only')
        return await asyncio.to_thread(os.pread, file_obj.fd, min(size, 1 << 20), offset)

    async def fstat(self, file_obj: object) -> SFTPAttrs:
        if isinstance(file_obj, _Download):
            st = os.fstat(file_obj.fd)
            return _file_attrs(st.st_size, 0o444, st.st_mtime)
        if isinstance(file_obj, _Upload):
            return _file_attrs(file_obj.size, 0o200, time.time(), self._caller.account.uid)
        raise SFTPFailure('bad handle')

    # --- uploads ------------------------------------------------------------------------------

    def _user_upload_dir(self) -> Path:
        """``UPLOADS/<uid>/``: root-owned 0700, made by root (never a user path)."""
        self._upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mine = self._upload_dir / str(self._caller.account.uid)
        try:
            os.mkdir(mine, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(mine)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise SFTPFailure('upload area unusable (see the gateway log)')
        return mine

    async def _new_upload(self, name: str) -> _Upload:
        if name in self._uploads:
            raise SFTPFailure(f'{name} is being uploaded already in this session')
        if len(self._uploads) >= MAX_OPEN_UPLOADS:
            raise SFTPFailure(f'at most {MAX_OPEN_UPLOADS} uploads at once')
        self._watch_channel()
        uid = self._caller.account.uid
        ledger = self._service.migrations
        token = ledger.enter(uid, LEDGER_UPLOAD)
        try:
            ledger.note_stored(uid, (await self._service.images.usage(uid))[0])
            path = self._user_upload_dir() / f'{secrets.token_hex(12)}.part'
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except BaseException:
            ledger.leave(token)
            raise
        up = _Upload(name, path, fd, token)
        self._uploads[name] = up
        return up

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        if not isinstance(file_obj, _Upload) or file_obj.closed:
            raise SFTPPermissionDenied('images are read-only: upload into /upload/NAME.tar')
        if file_obj.failed:
            raise SFTPFailure(file_obj.failed)
        end = offset + len(data)
        grow = max(0, end - file_obj.size)
        try:
            if end > MAX_UPLOAD:
                raise ImageError('quota-exceeded', f'an upload may be at most {MAX_UPLOAD} bytes')
            if grow:  # before it is written; refused past the account's quota
                self._service.migrations.charge(file_obj.token, grow, self._service.images)
        except ImageError as exc:
            self._give_up(file_obj, f'{exc.reason}: {one_line(exc)}')
            raise SFTPFailure(file_obj.failed) from None
        file_obj.size += grow
        file_obj.writing += 1
        try:
            await asyncio.to_thread(os.pwrite, file_obj.fd, data, offset)
        finally:
            file_obj.writing -= 1
            if file_obj.closed:  # the session ended meanwhile (_when_closed)
                file_obj.shut()
        return len(data)

    def _give_up(self, up: _Upload, failure: str) -> None:
        """A write of *up* was refused: the upload is over (the close reports *failure* and
        imports nothing); its spool file is emptied and removed and its charge released now,
        not when the client gets round to closing it."""
        up.failed = failure
        log.info('xos-images: upload %s of %s refused: %s', up.name, self._caller.account.name,
                 failure)
        try:
            os.ftruncate(up.fd, 0)
        except OSError:
            pass
        self._release(up)

    def _release(self, up: _Upload) -> None:
        """Remove *up*'s spool file; then it counts no more in the ledger."""
        try:
            os.unlink(up.path)
        except FileNotFoundError:
            pass
        if up.token:
            self._service.migrations.leave(up.token)
            up.token = 0

    async def close(self, file_obj: object) -> None:
        if isinstance(file_obj, _Download):
            os.close(file_obj.fd)
            return
        if not isinstance(file_obj, _Upload) or file_obj.closed:
            return
        up = file_obj
        up.shut()
        self._uploads.pop(up.name, None)
        uid = self._caller.account.uid
        if self.channel.is_closing() and not up.failed:
            # asyncssh closes what a client left open when its session ends: abandoned
            # (perhaps half written), nothing is imported and nobody is there to tell.
            self._release(up)
            log.info('xos-images: upload %s of %s abandoned after %d bytes', up.name,
                     self._caller.account.name, up.size)
            return
        try:
            try:
                if up.failed:
                    raise _Refused(up.failed)
                with open(up.path, 'rb', buffering=1 << 20) as f:
                    info = await self._service.import_archive(self._caller, f, upload=up.name)
            except Exception as exc:
                reason = getattr(exc, 'reason', None)
                if reason is None:
                    log.exception('xos-images: import of %s for %s failed', up.name,
                                  self._caller.account.name)
                    reason, text = 'internal-error', 'import failed inside xos-sshd (see its log)'
                else:
                    text = one_line(exc)
                self._service.record_upload(self._caller, up.name,
                                            {'ok': False, 'reason': reason, 'error': text})
                if self.channel.is_closing():  # nobody to tell; never break asyncssh's cleanup
                    return
                raise SFTPFailure(f'{reason}: {text}') from None
            try:  # its bytes are the account's stored image now (still charged to the upload
                # until released below: counted twice for a moment, never not at all)
                self._service.migrations.note_stored(
                    uid, (await self._service.images.usage(uid))[0])
            except OSError as exc:
                log.warning('xos-images: the image usage of uid %d is unreadable: %s', uid, exc)
        finally:
            self._release(up)
        self._service.record_upload(self._caller, up.name, {'ok': True, 'image': info.as_dict()})
        log.info('xos-images: %s uploaded %s as image %s', self._caller.account.name, up.name,
                 info.id)

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, _Upload):  # sftp -p on an upload: ignored
            raise SFTPPermissionDenied('attributes cannot be changed')

    async def exit(self) -> None:
        """The session is over: release its exports, and the uploads it left open (their
        spool files and their charge in the ledger).  Idempotent."""
        while self._exports:
            _image, path = self._exports.popitem()
            await self._service.release_export(path)
        while self._uploads:  # a session that ended mid-upload
            _name, up = self._uploads.popitem()
            up.shut()
            self._release(up)

    def _watch_channel(self) -> None:
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._when_closed())

    async def _when_closed(self) -> None:
        """asyncssh closes each open file, then calls :meth:`exit`, when the session ends;
        but a close that raises there (an import refused when a client's bad packet ended the
        session) stops its clean-up, and the connection is dropped.  Once the channel is
        closed, whatever is still held is released here."""
        await self.channel.wait_closed()
        await self.exit()

    # --- everything else: refused -------------------------------------------------------------

    def _denied(self, *_args: Any) -> None:
        raise SFTPPermissionDenied('not allowed in xos-images')

    setstat = lsetstat = remove = mkdir = rmdir = rename = posix_rename = _denied
    symlink = link = lock = unlock = _denied

    def readlink(self, path: bytes) -> bytes:
        raise SFTPNoSuchFile('no symbolic links here')

    def statvfs(self, path: bytes) -> Any:
        raise SFTPOpUnsupported('statvfs not supported')

    def fstatvfs(self, file_obj: object) -> Any:
        raise SFTPOpUnsupported('fstatvfs not supported')

    def fsync(self, file_obj: object) -> None:
        if not isinstance(file_obj, _Upload):
            raise SFTPPermissionDenied('not allowed in xos-images')

