"""Helpers of the image store tests: hand-made tar members, CRIU creds rewriting, archives.

The hostile archives are built byte by byte here (not with tarfile, which refuses to write
most of them), and CRIU core images are rewritten with a tiny protobuf encoder so a test can
give a thread another uid exactly as an attacker editing the files would.
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Iterable, Mapping

from xos_sshd.cr import imagecreds as ic
from xos_sshd.cr.manifest import FileEntry, Manifest, NodeKey, Owner, sign

BLOCK = 512


def ustar_header(name: bytes | str, size: int, *, kind: bytes = b'0', prefix: bytes = b'',
                 linkname: bytes = b'', size_field: bytes | None = None,
                 magic: bytes = b'ustar\x0000') -> bytes:
    """One 512-byte ustar header with a correct checksum (whatever it describes)."""
    if isinstance(name, str):
        name = name.encode()
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = b'0000444\0'
    h[108:116] = b'0000000\0'
    h[116:124] = b'0000000\0'
    h[124:136] = size_field if size_field is not None else f'{size:011o}\0'.encode()
    h[136:148] = b'00000000000\0'
    h[156:157] = kind
    h[157:157 + len(linkname)] = linkname
    h[257:265] = magic
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b' ' * 8
    h[148:156] = f'{sum(h):06o}\0 '.encode()
    return bytes(h)


def member(name: bytes | str, data: bytes = b'', **kw: object) -> bytes:
    """Header + data + padding."""
    return ustar_header(name, len(data), **kw) + data + bytes(-len(data) % BLOCK)  # type: ignore[arg-type]


def end() -> bytes:
    return bytes(2 * BLOCK)


def tar_of(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A well-formed archive of *files* in the given order (plain members)."""
    return b''.join(member(name, data) for name, data in files) + end()


def read_tar(data: bytes) -> dict[str, bytes]:
    """Members of an archive we made (export), by name."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            f = tar.extractfile(info)
            assert f is not None
            out[info.name] = f.read()
    return out


def signed_archive(key: NodeKey, files: Mapping[str, bytes], *, owner: Owner, uid: int,
                   gid: int, image_id: str = 'iforged0000000001', job_id: str | None = 'jforged',
                   node: str = 'node-a', listed: Mapping[str, bytes] | None = None,
                   extra_members: Iterable[tuple[str, bytes]] = ()) -> bytes:
    """An archive whose manifest is signed by *key*: it lists *listed* (default: *files*)."""
    import hashlib
    listed = files if listed is None else listed
    m = Manifest(id=image_id, owner=owner, uid=uid, gid=gid, command=('sh', '-c', 'x'),
                 job_id=job_id, node=node, created=1700000000.0, criu_version='4.1.1',
                 signer=key.fingerprint,
                 files={n: FileEntry(len(d), hashlib.sha256(d).hexdigest()) for n, d in listed.items()})
    mbytes = m.to_bytes()
    members = [('manifest.json', mbytes), ('manifest.sig', sign(key, mbytes)),
               *sorted(files.items()), *extra_members]
    return tar_of(members)


# -- protobuf, just enough to rewrite a core image's creds ------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(fields: Iterable[tuple[int, int, int | bytes]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += varint(number << 3 | wire)
        if wire == ic.WT_VARINT:
            assert isinstance(value, int)
            out += varint(value)
        elif wire == ic.WT_LEN:
            assert isinstance(value, bytes)
            out += varint(len(value)) + value
        elif wire == ic.WT_I64:
            out += struct.pack('<Q', value)
        else:
            out += struct.pack('<I', value)
    return bytes(out)


_CREDS_FIELD = {'uid': 1, 'gid': 2, 'euid': 3, 'egid': 4, 'suid': 5, 'sgid': 6, 'fsuid': 7,
                'fsgid': 8}


def rewrite_creds(core_img: bytes, *, raw_creds: bytes | None = None, **ids: int) -> bytes:
    """*core_img* (a CRIU core-N.img) with its thread's creds changed: ``uid=0`` etc. replace
    those ids; *raw_creds* replaces the whole creds_entry bytes."""
    entry = ic.first_entry(core_img, ic.CORE_MAGIC, 'core')
    core = list(ic.fields(entry))
    for i, (num, wire, value) in enumerate(core):
        if num != 5:
            continue
        assert isinstance(value, bytes)
        thread = list(ic.fields(value))
        for j, (tnum, twire, tvalue) in enumerate(thread):
            if tnum != 10:
                continue
            assert isinstance(tvalue, bytes)
            if raw_creds is not None:
                creds = raw_creds
            else:
                wanted = {_CREDS_FIELD[k]: v for k, v in ids.items()}
                creds = encode((n, w, wanted.get(n, v) if w == ic.WT_VARINT else v)
                               for n, w, v in ic.fields(tvalue))
            thread[j] = (tnum, twire, creds)
        core[i] = (num, wire, encode(thread))
    body = encode(core)
    return core_img[:8] + struct.pack('<I', len(body)) + body
