"""Writer of the binary NSS index read by ``native/libnss_xos.c``.

The AMS writes the text tables ``passwd`` and ``group`` (the /etc formats)
into its nss directory and then calls :func:`write_index` with the same
entries.  The index (``nss.index``, format in ``docs/nss-index.md``) holds
open-addressing hash tables so that libnss_xos answers every lookup in O(1)
from a read-only mmap, without a daemon on the lookup path.

The file is always replaced atomically (temp file in the same directory,
fsync, rename, fsync of the directory) and never rewritten in place: a
process that has the old version mapped keeps reading it safely, and the
next lookup notices the new inode with one stat().
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from pathlib import Path
from typing import Iterable, Sequence

from ..fsutil import atomic_write

__all__ = [
    "INDEX_NAME",
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "NSSIndexError",
    "fnv1a64",
    "build_index",
    "write_index",
    "read_header",
    "seal_header",
]

INDEX_NAME = "nss.index"
MAGIC = b"XOSNSSI\0"
VERSION = 1
HEADER_SIZE = 256
CHECKSUM_OFFSET = 248  # FNV-1a 64 of header bytes [0, 248)

# Section numbers, in header order (docs/nss-index.md).
S_STRINGS, S_USERS, S_GROUPS, S_MEMREFS, S_MEMBERS, S_GIDS = range(6)
S_H_PWNAM, S_H_PWUID, S_H_GRNAM, S_H_GRGID, S_H_MEMBER = range(6, 11)
SECTION_COUNT = 11
HASH_COUNT = 5

USER_SIZE = 40
GROUP_SIZE = 20
MEMREF_SIZE = 8
MEMBER_SIZE = 16
BUCKET_SIZE = 8

# Header field offsets.
OFF_VERSION = 8
OFF_HEADER_SIZE = 12
OFF_GENERATION = 16
OFF_FILE_SIZE = 24
OFF_N_USERS = 32
OFF_N_GROUPS = 36
OFF_N_MEMBERS = 40
OFF_FLAGS = 44
OFF_SECTIONS = 48
OFF_MAX_PROBE = 224

MIN_BUCKETS = 8
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 is "no id"

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF

PasswdEntry = tuple[str, int, int, str, str, str]
GroupEntry = tuple[str, int, list[str]]


class NSSIndexError(ValueError):
    """Entries that must not go into the index (bad names, uid 0, ...)."""


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64 over ``data``; the same function as in libnss_xos.c."""
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


def _hash_id(n: int) -> int:
    """Numeric ids are hashed as their 4 little-endian bytes (unrolled)."""
    h = ((_FNV_OFFSET ^ (n & 0xFF)) * _FNV_PRIME) & _MASK64
    h = ((h ^ ((n >> 8) & 0xFF)) * _FNV_PRIME) & _MASK64
    h = ((h ^ ((n >> 16) & 0xFF)) * _FNV_PRIME) & _MASK64
    return ((h ^ (n >> 24)) * _FNV_PRIME) & _MASK64


# Name hashes are memoised: the AMS rewrites the index after every change,
# and nearly all names are the same as last time.
_name_hash_cache: dict[bytes, int] = {}


def _hash_name(b: bytes) -> int:
    h = _name_hash_cache.get(b)
    if h is None:
        if len(_name_hash_cache) > 1_000_000:
            _name_hash_cache.clear()
        h = _name_hash_cache[b] = fnv1a64(b)
    return h


# Characters that would break the /etc formats (',' separates group members).
_BAD_NAME = re.compile(r"[:\n\0,]|^\s|\s$")
_BAD_FIELD = re.compile(r"[:\n\0]")


def _check_name(kind: str, name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise NSSIndexError(f"{kind}: empty or non-string name {name!r}")
    if name == "root":
        raise NSSIndexError(f"{kind}: the name root is never served by libnss_xos")
    b = name.encode("utf-8")
    if len(b) > 256 or _BAD_NAME.search(name):
        raise NSSIndexError(f"{kind}: invalid name {name!r}")
    return b


def _check_field(kind: str, value: str) -> bytes:
    if not isinstance(value, str) or _BAD_FIELD.search(value):
        raise NSSIndexError(f"{kind}: invalid field {value!r}")
    return value.encode("utf-8")


def _check_id(kind: str, n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_ID:
        raise NSSIndexError(f"{kind}: id {n!r} out of range (uid/gid 0 is never served)")
    return n


class _Strings:
    """The string section: UTF-8 bytes, each NUL-terminated, de-duplicated."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.offsets: dict[bytes, int] = {}

    def add(self, b: bytes) -> tuple[int, int]:
        off = self.offsets.get(b)
        if off is None:
            off = self.offsets[b] = len(self.buf)
            self.buf += b
            self.buf.append(0)
        return off, len(b)


def _hash_table(items: Iterable[tuple[int, int]]) -> tuple[bytes, int]:
    """Open addressing with linear probing; ``items`` are (hash, record index).

    Returns the bucket array (``{u32 tag = h >> 32, u32 index + 1}``, load
    factor <= 1/2) and the longest probe sequence, which bounds every lookup.
    The caller passes each key once (first occurrence wins).
    """
    items = list(items)
    nb = MIN_BUCKETS
    while nb < 2 * len(items):
        nb *= 2
    mask = nb - 1
    buckets = array("I", bytes(8 * nb))
    max_probe = 0
    for h, idx in items:
        slot = h & mask
        probe = 1
        while buckets[2 * slot + 1]:
            slot = (slot + 1) & mask
            probe += 1
        buckets[2 * slot] = h >> 32
        buckets[2 * slot + 1] = idx + 1
        if probe > max_probe:
            max_probe = probe
    if sys.byteorder != "little":
        buckets.byteswap()
    return buckets.tobytes(), max_probe


def _u32_array(values: list[int]) -> bytes:
    a = array("I", values)
    if a.itemsize != 4:  # pragma: no cover - every Linux ABI has 4-byte "I"
        a = array("L", values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _name(kind: str, name: str, names: dict[str, bytes]) -> bytes:
    b = names.get(name)
    if b is None:
        b = names[name] = _check_name(kind, name)
    return b


def _users(entries: Sequence[PasswdEntry], strings: _Strings, names: dict[str, bytes]):
    users: list[int] = []
    name_items: list[tuple[int, int]] = []
    uid_items: list[tuple[int, int]] = []
    seen: set[bytes] = set()
    seen_ids: set[int] = set()
    add = strings.add
    for i, (name, uid, gid, gecos, home, shell) in enumerate(entries):
        nb = _name("passwd", name, names)
        if nb in seen:
            raise NSSIndexError(f"passwd: duplicate user {name!r}")
        seen.add(nb)
        _check_id("passwd", uid)
        _check_id("passwd", gid)
        users.extend((uid, gid))
        users.extend(add(nb))
        users.extend(add(_check_field("passwd", gecos)))
        users.extend(add(_check_field("passwd", home)))
        users.extend(add(_check_field("passwd", shell)))
        name_items.append((_hash_name(nb), i))
        if uid not in seen_ids:
            seen_ids.add(uid)
            uid_items.append((_hash_id(uid), i))
    return users, name_items, uid_items


def _groups(entries: Sequence[GroupEntry], strings: _Strings, names: dict[str, bytes]):
    groups: list[int] = []
    memrefs: list[int] = []
    name_items: list[tuple[int, int]] = []
    gid_items: list[tuple[int, int]] = []
    seen: set[bytes] = set()
    seen_ids: set[int] = set()
    member_gids: dict[bytes, list[int]] = {}
    add = strings.add
    for i, (name, gid, members) in enumerate(entries):
        nb = _name("group", name, names)
        if nb in seen:
            raise NSSIndexError(f"group: duplicate group {name!r}")
        seen.add(nb)
        _check_id("group", gid)
        first = len(memrefs) // 2
        count = 0
        if members:
            for mb in dict.fromkeys(_name("group member", m, names) for m in members):
                memrefs.extend(add(mb))
                count += 1
                gids = member_gids.get(mb)
                if gids is None:
                    member_gids[mb] = [gid]
                elif gid not in gids:
                    gids.append(gid)
        groups.append(gid)
        groups.extend(add(nb))
        groups.extend((first, count))
        name_items.append((_hash_name(nb), i))
        if gid not in seen_ids:
            seen_ids.add(gid)
            gid_items.append((_hash_id(gid), i))
    return groups, memrefs, name_items, gid_items, member_gids


def build_index(
    passwd_entries: Sequence[PasswdEntry],
    group_entries: Sequence[GroupEntry],
    generation: int = 1,
) -> bytes:
    """The index file's bytes for these entries (see docs/nss-index.md).

    Raises :class:`NSSIndexError` for entries libnss_xos must never serve (uid or
    gid 0, the name root), names that would break the /etc formats, and
    duplicate user or group names.  Duplicate uids/gids are allowed; the first
    entry wins for lookups by id, as in /etc/passwd.
    """
    strings = _Strings()
    names: dict[str, bytes] = {}  # validated names, shared by passwd and group
    users, pw_name_items, pw_uid_items = _users(passwd_entries, strings, names)
    groups, memrefs, gr_name_items, gr_gid_items, member_gids = _groups(group_entries, strings, names)

    # initgroups: member name -> the gids of every group listing it.
    members_rec: list[int] = []
    gid_pool: list[int] = []
    member_items: list[tuple[int, int]] = []
    add = strings.add
    for i, (mb, gids) in enumerate(member_gids.items()):
        off, ln = add(mb)
        members_rec.extend((off, ln, len(gid_pool), len(gids)))
        gid_pool.extend(gids)
        member_items.append((_hash_name(mb), i))

    tables = [
        _hash_table(pw_name_items),
        _hash_table(pw_uid_items),
        _hash_table(gr_name_items),
        _hash_table(gr_gid_items),
        _hash_table(member_items),
    ]
    sections = [
        bytes(strings.buf),
        _u32_array(users),
        _u32_array(groups),
        _u32_array(memrefs),
        _u32_array(members_rec),
        _u32_array(gid_pool),
    ] + [t[0] for t in tables]

    body = bytearray()
    descriptors = []
    for data in sections:
        body += bytes(-len(body) % 8)  # every section starts 8-aligned
        descriptors.append((HEADER_SIZE + len(body), len(data)))
        body += data
    body += bytes(-len(body) % 8)
    file_size = HEADER_SIZE + len(body)

    header = bytearray(HEADER_SIZE)
    header[0:8] = MAGIC
    struct.pack_into(
        "<IIQQIIII",
        header,
        OFF_VERSION,
        VERSION,
        HEADER_SIZE,
        generation,
        file_size,
        len(passwd_entries),
        len(group_entries),
        len(member_gids),
        0,
    )
    for n, (off, ln) in enumerate(descriptors):
        struct.pack_into("<QQ", header, OFF_SECTIONS + 16 * n, off, ln)
    struct.pack_into("<5I", header, OFF_MAX_PROBE, *(t[1] for t in tables))
    seal_header(header)
    return bytes(header) + bytes(body)


def seal_header(header: bytearray) -> None:
    """(Re)computes the header checksum in place."""
    struct.pack_into("<Q", header, CHECKSUM_OFFSET, fnv1a64(bytes(header[:CHECKSUM_OFFSET])))


def read_header(path: Path) -> dict | None:
    """The header fields of an index file, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            h = f.read(HEADER_SIZE)
    except OSError:
        return None
    if len(h) < HEADER_SIZE or h[:8] != MAGIC:
        return None
    (checksum,) = struct.unpack_from("<Q", h, CHECKSUM_OFFSET)
    if checksum != fnv1a64(h[:CHECKSUM_OFFSET]):
        return None
    version, header_size, generation, file_size, nu, ng, nm, flags = struct.unpack_from(
        "<IIQQIIII", h, OFF_VERSION
    )
    return {
        "version": version,
        "header_size": header_size,
        "generation": generation,
        "file_size": file_size,
        "n_users": nu,
        "n_groups": ng,
        "n_members": nm,
        "flags": flags,
        "sections": [struct.unpack_from("<QQ", h, OFF_SECTIONS + 16 * n) for n in range(SECTION_COUNT)],
        "max_probe": list(struct.unpack_from("<5I", h, OFF_MAX_PROBE)),
    }


def write_index(
    nss_dir: Path,
    passwd_entries: list[PasswdEntry],
    group_entries: list[GroupEntry],
) -> int:
    """Builds ``nss_dir/nss.index`` from the entries and replaces it atomically.

    ``passwd_entries``: (name, uid, gid, gecos, home, shell);
    ``group_entries``: (name, gid, member names).  Returns the new generation
    (the previous file's generation + 1).  Raises :class:`NSSIndexError` (a
    ValueError) before touching the directory if an entry is not acceptable.
    """
    nss_dir = Path(nss_dir)
    path = nss_dir / INDEX_NAME
    old = read_header(path)
    generation = old["generation"] + 1 if old else 1
    data = build_index(passwd_entries, group_entries, generation)
    nss_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(path, data)
    return generation
