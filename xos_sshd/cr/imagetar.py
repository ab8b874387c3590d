"""Image archives: a deterministic ustar writer and a strict, streaming reader for hostile input.

An exported image is one tar of ``manifest.json``, ``manifest.sig`` and the image files, in
that order then by name, each a plain ustar regular-file member (mode 0444, owner root,
mtime = the image's creation time), so the same image always gives the same bytes.

Uploaded archives come from anyone, so they are not read with :mod:`tarfile` (which follows
pax and GNU extensions, sparse files, links, devices, base-256 sizes and long names) but by
:func:`read_archive`, which accepts only what the writer produces: 512-byte ustar headers with
a correct checksum, type ``0`` (regular file), an empty prefix, a safe name (no ``/``, no
``..``), an octal size.  Everything else — symlinks, hard links, devices, directories, fifos,
pax/GNU extension headers, duplicate names, more than *max_members* members, a total declared
size over *max_bytes*, truncation — is refused with :class:`ImageError` ``bad-archive``
naming the member, *before* any of its data is read or written.  Data is streamed to the caller's sink in chunks, never held whole in memory.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from typing import BinaryIO, Protocol

from .manifest import MANIFEST, SIGNATURE, ImageError, valid_name

BLOCK = 512
CHUNK = 1 << 20
_TYPES = {b'1': 'a hard link', b'2': 'a symbolic link', b'3': 'a character device',
          b'4': 'a block device', b'5': 'a directory', b'6': 'a fifo', b'7': 'a contiguous file',
          b'x': 'a pax extended header', b'g': 'a pax global header',
          b'L': 'a GNU long name', b'K': 'a GNU long link name', b'S': 'a GNU sparse file'}


class Sink(Protocol):
    """Where one member's data goes (the reader calls write for each chunk, then close)."""

    def write(self, data: bytes) -> object: ...

    def close(self) -> None: ...


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to *n* bytes (fewer only at end of file), whatever short reads *src* does."""
    parts, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b''.join(parts)


def _octal(field: bytes, what: str) -> int:
    text = field.rstrip(b'\0 ').lstrip(b' ')
    if field[:1] and field[0] & 0x80:
        raise ImageError('bad-archive', f'{what} uses a base-256 number')
    if not text or not all(48 <= c <= 55 for c in text):
        raise ImageError('bad-archive', f'{what} is not an octal number')
    return int(text, 8)


def _name(header: bytes) -> str:
    raw = header[0:100]
    name, _, rest = raw.partition(b'\0')
    if rest.strip(b'\0'):
        raise ImageError('bad-archive', f'member name {name[:100]!r} has data after its end')
    try:
        return name.decode('ascii')
    except UnicodeDecodeError:
        raise ImageError('bad-archive', f'member name {name!r} is not ASCII') from None


def _check_header(header: bytes, index: int) -> tuple[str, int]:
    """(name, size) of a valid regular-file member header; ImageError otherwise."""
    stored = _octal(header[148:156], f'member {index} checksum')
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != unsigned:
        raise ImageError('bad-archive', f'member {index}: bad header checksum (not a tar, or '
                         'a damaged one)')
    name = _name(header)
    label = f'member {name!r}' if name else f'member {index}'
    magic = header[257:265]
    if magic not in (b'ustar\x0000', b'ustar  \x00'):
        raise ImageError('bad-archive', f'{label}: not a ustar header')
    kind = header[156:157]
    if kind not in (b'0', b'\0'):
        what = _TYPES.get(kind, f'of type {kind!r}')
        raise ImageError('bad-archive', f'{label} is {what}: only regular files are allowed')
    if header[345:500].strip(b'\0'):
        raise ImageError('bad-archive', f'{label} has a path prefix: names must not contain "/"')
    if not (valid_name(name) or name in (MANIFEST, SIGNATURE)):
        raise ImageError('bad-archive', f'{label} is not a plain file name '
                         '([A-Za-z0-9._-], no "/", no "." or "..")')
    return name, _octal(header[124:136], f'{label} size')


def read_archive(src: BinaryIO, open_member: Callable[[str, int], Sink], *,
                 max_members: int, max_bytes: int,
                 oversize: Callable[[str, int], ImageError] | None = None) -> list[str]:
    """Read a hostile archive from *src*; return the member names in order.

    For each member, *open_member(name, size)* gives the sink its data is streamed to; it is
    called only after every check on the header passed, including the running totals (it
    may refuse the member itself by raising).  *max_bytes* caps the declared sizes of all
    members together; *oversize(name, total)* makes the error for exceeding it (default
    ``bad-archive``).
    """
    names: list[str] = []
    seen: set[str] = set()
    total = 0
    while True:
        header = _read_exact(src, BLOCK)
        if not header:
            break  # end of file at a member boundary: tolerated
        if len(header) < BLOCK:
            raise ImageError('bad-archive', 'the archive ends inside a header (truncated)')
        if header == bytes(BLOCK):
            break  # end-of-archive marker; whatever follows is ignored
        name, size = _check_header(header, len(names) + 1)
        if name in seen:
            raise ImageError('bad-archive', f'member {name!r} appears twice')
        if len(names) >= max_members:
            raise ImageError('bad-archive', f'more than {max_members} members')
        total += size
        if total > max_bytes:
            if oversize is not None:
                raise oversize(name, total)
            raise ImageError('bad-archive', f'member {name!r} declares {size} bytes: the '
                             f'archive would exceed {max_bytes} bytes')
        seen.add(name)
        names.append(name)
        sink = open_member(name, size)
        try:
            left = size
            while left:
                chunk = _read_exact(src, min(CHUNK, left))
                if not chunk:
                    raise ImageError('bad-archive', f'the archive ends inside {name!r} (truncated)')
                sink.write(chunk)
                left -= len(chunk)
        finally:
            sink.close()
        pad = -size % BLOCK
        if pad and len(_read_exact(src, pad)) != pad:
            raise ImageError('bad-archive', f'the archive ends inside {name!r} (truncated)')
    return names


def member_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    """The header the writer gives every member (deterministic: root, 0444, fixed mtime)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = 'root'
    info.mtime = int(mtime)
    info.type = tarfile.REGTYPE
    return info


def open_writer(dst: BinaryIO) -> tarfile.TarFile:
    """A ustar writer on *dst* (plain headers only: what :func:`read_archive` accepts)."""
    return tarfile.open(fileobj=dst, mode='w', format=tarfile.USTAR_FORMAT)
