"""The credentials a CRIU image will give its processes, read from the image files.

A restored process runs with whatever credentials its image records (design: "an unverified
image is a root exploit").  CRIU records them per thread, in ``core-<tid>.img``::

    core_entry        field 5  thread_core (thread_core_entry)
    thread_core_entry field 10 creds       (creds_entry)
    creds_entry       fields 1-8 uid gid euid egid suid sgid fsuid fsgid (uint32),
                      9-12 cap_inh cap_prm cap_eff cap_bnd (repeated uint32), 13 secbits,
                      14 groups (repeated uint32)

(CRIU's ``images/core.proto`` and ``images/creds.proto``).  A zombie's core has no
``thread_core``: CRIU restores a task whose ``core_entry.tc.task_state`` (field 3, field 1) is
``TASK_DEAD`` (2) by forking it and letting it exit at once with the recorded status
(``restore_one_zombie``), so it never runs with any credentials of its own; such a core is
the only one allowed to carry no creds.  An image file is
``[IMG_COMMON_MAGIC] [type magic]`` (two little-endian u32) then entries, each a
little-endian u32 length and that many bytes of protobuf; CRIU reads one ``core_entry`` per
core file.  Very old images kept the creds in ``creds-<pid>.img`` (one ``creds_entry``), which
CRIU 4 still reads when a core has no ``creds``: such files are checked too.

There is no ``crit`` (CRIU's image tool) in the CRIU this project installs, and no protobuf
runtime is needed: the protobuf *wire format* is small, and only three messages matter.  The
decoder is deliberately stricter than protobuf-c, which CRIU uses, wherever the two could
disagree on what a hostile file means: a uint32 varint >= 2**32 (protobuf-c keeps the low 32
bits: 2**32 would be uid 0), a known field with the wrong wire type, a message field or a
scalar that appears twice (protobuf-c merges or keeps the last), groups, truncation: each is
refused.  Unknown fields are skipped, as protobuf-c does.

:func:`check_image_credentials` is what the image store calls: every thread must have exactly
the account's uid (real, effective, saved, fs), its gid (all four), its supplementary groups
and no inheritable, permitted or effective capability.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
CORE_MAGIC = 0x55053847
TASK_DEAD = 2
CREDS_MAGIC = 0x54023547
#: A core file is a few KiB; anything far bigger is not one CRIU wrote.
MAX_CORE_BYTES = 16 << 20

CORE_FILE = re.compile(r'^core-([0-9]{1,10})\.img\Z')
CREDS_FILE = re.compile(r'^creds-([0-9]{1,10})\.img\Z')

WT_VARINT, WT_I64, WT_LEN, WT_SGROUP, WT_EGROUP, WT_I32 = 0, 1, 2, 3, 4, 5


class CredsFormatError(ValueError):
    """An image file is not what CRIU would write: the credentials cannot be known."""


@dataclass(frozen=True)
class ThreadCreds:
    """One thread's recorded credentials (``source``: the image file it came from)."""

    source: str
    uids: tuple[int, int, int, int]  # real, effective, saved, fs
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_inh: tuple[int, ...]
    cap_prm: tuple[int, ...]
    cap_eff: tuple[int, ...]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at *pos*; return (value, new position)."""
    value, shift = 0, 0
    for i in range(10):
        if pos + i >= len(buf):
            raise CredsFormatError('truncated varint')
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                raise CredsFormatError('varint out of range')
            return value, pos + i + 1
        shift += 7
    raise CredsFormatError('varint longer than 10 bytes')


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The ``(field number, wire type, value)`` of a protobuf message, in order.

    Values: ints for varint/fixed fields, bytes for length-delimited ones.  Groups and
    malformed input raise :class:`CredsFormatError`.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            raise CredsFormatError(f'bad field number {number}')
        if wire == WT_VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire in (WT_I64, WT_I32):
            width = 8 if wire == WT_I64 else 4
            if pos + width > len(buf):
                raise CredsFormatError('truncated fixed-width field')
            yield number, wire, int.from_bytes(buf[pos:pos + width], 'little')
            pos += width
        elif wire == WT_LEN:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise CredsFormatError('truncated length-delimited field')
            yield number, wire, buf[pos:pos + length]
            pos += length
        else:
            raise CredsFormatError(f'unsupported wire type {wire} (field {number})')


def _u32(value: int | bytes, what: str) -> int:
    if not isinstance(value, int) or value > 0xFFFFFFFF:
        raise CredsFormatError(f'{what} is not a uint32')
    return value


def _repeated_u32(wire: int, value: int | bytes, what: str) -> list[int]:
    """A repeated uint32 element, unpacked (varint) or packed (length-delimited)."""
    if wire == WT_VARINT:
        return [_u32(value, what)]
    if wire == WT_LEN:
        assert isinstance(value, bytes)
        out, pos = [], 0
        while pos < len(value):
            v, pos = _varint(value, pos)
            out.append(_u32(v, what))
        return out
    raise CredsFormatError(f'{what} has wire type {wire}')


def _only_message(buf: bytes, number: int, what: str) -> bytes | None:
    """The one length-delimited field *number* of *buf* (None if absent; twice: refused)."""
    found: bytes | None = None
    for num, wire, value in fields(buf):
        if num != number:
            continue
        if wire != WT_LEN:
            raise CredsFormatError(f'{what} has wire type {wire}')
        if found is not None:
            raise CredsFormatError(f'{what} appears twice')
        assert isinstance(value, bytes)
        found = value
    return found


_SCALARS = ('uid', 'gid', 'euid', 'egid', 'suid', 'sgid', 'fsuid', 'fsgid')
_REPEATED = {9: 'cap_inh', 10: 'cap_prm', 11: 'cap_eff', 12: 'cap_bnd', 14: 'groups'}


def parse_creds_entry(buf: bytes, source: str) -> ThreadCreds:
    """Decode a ``creds_entry``; every required id must be there exactly once."""
    scalars: dict[str, int] = {}
    repeated: dict[str, list[int]] = {name: [] for name in _REPEATED.values()}
    for num, wire, value in fields(buf):
        if 1 <= num <= 8:
            name = _SCALARS[num - 1]
            if wire != WT_VARINT:
                raise CredsFormatError(f'{name} has wire type {wire}')
            if name in scalars:
                raise CredsFormatError(f'{name} appears twice')
            scalars[name] = _u32(value, name)
        elif num in _REPEATED:
            repeated[_REPEATED[num]] += _repeated_u32(wire, value, _REPEATED[num])
    missing = [n for n in _SCALARS if n not in scalars]
    if missing:
        raise CredsFormatError(f'creds without {", ".join(missing)}')
    s = scalars
    return ThreadCreds(source=source,
                       uids=(s['uid'], s['euid'], s['suid'], s['fsuid']),
                       gids=(s['gid'], s['egid'], s['sgid'], s['fsgid']),
                       groups=tuple(repeated['groups']), cap_inh=tuple(repeated['cap_inh']),
                       cap_prm=tuple(repeated['cap_prm']), cap_eff=tuple(repeated['cap_eff']))


def first_entry(data: bytes, magic: int, what: str) -> bytes:
    """The first protobuf entry of a CRIU image file with type magic *magic*."""
    if len(data) < 12:
        raise CredsFormatError(f'{what}: too short for a CRIU image')
    common, kind, size = struct.unpack_from('<III', data)
    if common != IMG_COMMON_MAGIC or kind != magic:
        raise CredsFormatError(f'{what}: not a CRIU image of the expected kind '
                               f'(magic {common:#x} {kind:#x})')
    if 12 + size > len(data):
        raise CredsFormatError(f'{what}: truncated entry')
    return data[12:12 + size]


def task_state(core: bytes, source: str) -> int | None:
    """``core_entry.tc.task_state`` (None when the core has no task_core: a thread's)."""
    tc = _only_message(core, 3, f'{source}: tc')
    if tc is None:
        return None
    states = [v for num, wire, v in fields(tc) if num == 1]
    if len(states) != 1 or not isinstance(states[0], int):
        raise CredsFormatError(f'{source}: task_state missing or repeated')
    return _u32(states[0], 'task_state')


def core_creds(data: bytes, source: str) -> ThreadCreds | None:
    """The creds of a ``core-<tid>.img``; None for a zombie (see the module docstring)."""
    core = first_entry(data, CORE_MAGIC, source)
    thread_core = _only_message(core, 5, f'{source}: thread_core')
    creds = None if thread_core is None else _only_message(thread_core, 10, f'{source}: creds')
    if creds is not None:
        return parse_creds_entry(creds, source)
    if task_state(core, source) == TASK_DEAD:
        return None
    raise CredsFormatError(f'{source} records no credentials and is not a zombie')


def legacy_creds(data: bytes, source: str) -> ThreadCreds:
    """The creds of an old-format ``creds-<pid>.img``."""
    return parse_creds_entry(first_entry(data, CREDS_MAGIC, source), source)


def read_small(dir_fd: int, name: str) -> bytes:
    """Read a whole (small) image file, root-side, by name in an already-trusted directory."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, 'rb', closefd=False) as f:
            data = f.read(MAX_CORE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CORE_BYTES:
        raise CredsFormatError(f'{name}: larger than any core image')
    return data


def image_credentials(dir_fd: int, names: Sequence[str]) -> list[ThreadCreds]:
    """Every thread's credentials in the image whose files *names* are in *dir_fd*.

    Each ``core-*.img`` but a zombie's must carry creds (CRIU 4 always writes them; without
    them CRIU would leave the thread with whatever the restoring CRIU has, or look for a
    legacy creds file); each ``creds-*.img`` is decoded as well.  At least one live thread is
    required.
    """
    out: list[ThreadCreds] = []
    for name in sorted(names, key=lambda n: [int(p) if p.isdigit() else p
                                             for p in re.split(r'([0-9]+)', n)]):
        if CORE_FILE.match(name):
            creds = core_creds(read_small(dir_fd, name), name)
            if creds is not None:
                out.append(creds)
        elif CREDS_FILE.match(name):
            out.append(legacy_creds(read_small(dir_fd, name), name))
    if not out:
        raise CredsFormatError('the image has no live thread (core-*.img with creds): not a '
                               'CRIU process image')
    return out


def credentials_problem(creds: Sequence[ThreadCreds], uid: int, gid: int,
                        groups: Sequence[int]) -> str | None:
    """Why *creds* are not exactly (uid, gid, groups, no capabilities); None when they are."""
    want_groups = sorted(set(groups))
    for c in creds:
        if c.uids != (uid,) * 4:
            return f'{c.source} has uids {list(c.uids)} (expected {uid})'
        if c.gids != (gid,) * 4:
            return f'{c.source} has gids {list(c.gids)} (expected {gid})'
        if sorted(set(c.groups)) != want_groups:
            return f'{c.source} has groups {sorted(set(c.groups))} (expected {want_groups})'
        for name in ('cap_inh', 'cap_prm', 'cap_eff'):
            if any(getattr(c, name)):
                return f'{c.source} has {name} {list(getattr(c, name))} (expected none)'
    return None
