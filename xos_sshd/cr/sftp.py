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
links, removals, attribute changes).  Uploads are bounded: :data:`MAX_UPLOAD` bytes (or the
image store's byte quota when smaller) and :data:`MAX_OPEN_UPLOADS` at once per session.
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

from .service import IMAGE_ID, UPLOAD_NAME, Caller, CRService

log = logging.getLogger(__name__)

MAX_UPLOAD = 64 << 30
MAX_OPEN_UPLOADS = 4
#: Bytes in the upload spool per uid, across all sessions: bounded by the same limit as one
#: upload, so that many sessions cannot fill the gateway's disk.
_SPOOLED: dict[int, int] = {}
UPLOAD = 'upload'
_WRITE_FLAGS = FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC | FXF_EXCL


class _Download:
    def __init__(self, image_id: str, path: Any, fd: int) -> None:
        self.image_id, self.path, self.fd = image_id, path, fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """For asyncssh's sparse-ranges extension, which seeks file objects itself."""
        return os.lseek(self.fd, offset, whence)


class _Upload:
    def __init__(self, name: str, path: Path, fd: int) -> None:
        self.name, self.path, self.fd = name, path, fd
        self.size = 0
        self.closed = False
        self.failed = ''  # a write was refused: the close reports it, imports nothing


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
        self._started = time.time()
        quota = getattr(service.images, 'quota_bytes', None)
        self._limit = min(MAX_UPLOAD, quota) if isinstance(quota, int) and quota > 0 else MAX_UPLOAD

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
        path = self._exports.get(image_id)
        if path is None or not path.exists():
            path = self._exports[image_id] = Path(await self._call(
                self._service.export_archive(self._caller, image_id)))
        return path

    async def _call(self, coro: Any) -> Any:
        """Run a service call; its refusals become SFTP errors with the reason."""
        from .images import ImageError
        from .jobs import JobError
        from .service import CRError
        try:
            return await coro
        except (ImageError, JobError, CRError) as exc:
            if exc.reason in ('no-such-image', 'no-such-job'):
                raise SFTPNoSuchFile(str(exc)) from None
            raise SFTPFailure(f'{exc.reason}: {" ".join(str(exc).split())}') from None

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
            return self._new_upload(name)
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

    def _new_upload(self, name: str) -> _Upload:
        if name in self._uploads:
            raise SFTPFailure(f'{name} is being uploaded already in this session')
        if len(self._uploads) >= MAX_OPEN_UPLOADS:
            raise SFTPFailure(f'at most {MAX_OPEN_UPLOADS} uploads at once')
        path = self._user_upload_dir() / f'{secrets.token_hex(12)}.part'
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        up = _Upload(name, path, fd)
        self._uploads[name] = up
        return up

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        if not isinstance(file_obj, _Upload) or file_obj.closed:
            raise SFTPPermissionDenied('images are read-only: upload into /upload/NAME.tar')
        end = offset + len(data)
        uid = self._caller.account.uid
        grow = max(0, end - file_obj.size)
        if file_obj.failed:
            raise SFTPFailure(file_obj.failed)
        if end > self._limit or _SPOOLED.get(uid, 0) + grow > self._limit:
            file_obj.failed = (f'quota-exceeded: uploads in progress may hold at most '
                               f'{self._limit} bytes')
            raise SFTPFailure(file_obj.failed)
        _SPOOLED[uid] = _SPOOLED.get(uid, 0) + grow
        file_obj.size += grow
        await asyncio.to_thread(os.pwrite, file_obj.fd, data, offset)
        return len(data)

    def _unspool(self, up: _Upload) -> None:
        uid = self._caller.account.uid
        left = _SPOOLED.get(uid, 0) - up.size
        if left > 0:
            _SPOOLED[uid] = left
        else:
            _SPOOLED.pop(uid, None)
        up.size = 0

    async def close(self, file_obj: object) -> None:
        if isinstance(file_obj, _Download):
            os.close(file_obj.fd)
            return
        if not isinstance(file_obj, _Upload) or file_obj.closed:
            return
        up = file_obj
        up.closed = True
        os.close(up.fd)
        self._uploads.pop(up.name, None)
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
                text = ' '.join(str(exc).split())
            self._service.record_upload(self._caller, up.name,
                                        {'ok': False, 'reason': reason, 'error': text})
            raise SFTPFailure(f'{reason}: {text}') from None
        finally:
            self._unspool(up)
            try:
                os.unlink(up.path)
            except FileNotFoundError:
                pass
        self._service.record_upload(self._caller, up.name, {'ok': True, 'image': info.as_dict()})
        log.info('xos-images: %s uploaded %s as image %s', self._caller.account.name, up.name,
                 info.id)

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, _Upload):  # sftp -p on an upload: ignored
            raise SFTPPermissionDenied('attributes cannot be changed')

    async def exit(self) -> None:
        for path in self._exports.values():
            await self._service.release_export(path)
        self._exports.clear()
        for up in list(self._uploads.values()):  # a session that ended mid-upload
            if not up.closed:
                up.closed = True
                os.close(up.fd)
            self._unspool(up)
            try:
                os.unlink(up.path)
            except FileNotFoundError:
                pass
        self._uploads.clear()

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

