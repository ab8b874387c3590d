"""Unit tests of what the image store parses from hostile bytes: CRIU creds and manifests.

The credentials decoder must never read a uid that CRIU (protobuf-c) would read differently;
the manifest parser must refuse anything ambiguous.  No CRIU needed: the core images here
are built with the same wire format.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from imagehelpers import encode, varint

from xos_sshd.cr import imagecreds as ic
from xos_sshd.cr.manifest import (
    ImageError,
    load_or_create_node_key,
    parse_manifest,
    sign,
    verify,
)

V, L = ic.WT_VARINT, ic.WT_LEN


def creds(uid: int = 5000, gid: int = 5000, groups: tuple[int, ...] = (7000,),
          caps: int = 0, **override: object) -> list[tuple[int, int, int | bytes]]:
    fields: list[tuple[int, int, int | bytes]] = [(n, V, uid if n % 2 else gid) for n in range(1, 9)]
    for n in (9, 10, 11, 12):
        fields += [(n, V, caps if n != 12 else 0xFFFFFFFF), (n, V, 0)]
    fields += [(13, V, 0)] + [(14, V, g) for g in groups]
    return fields


def core_img(creds_bytes: bytes | None, *, state: int | None = None, thread: bool = True) -> bytes:
    core: list[tuple[int, int, int | bytes]] = [(1, V, 1)]
    if state is not None:
        core.append((3, L, encode([(1, V, state), (2, V, 0), (3, V, 0), (4, V, 0), (5, V, 0),
                                   (6, L, b'sh')])))
    if thread:
        tc: list[tuple[int, int, int | bytes]] = [(1, V, 0), (2, V, 0)]
        if creds_bytes is not None:
            tc.append((10, L, creds_bytes))
        core.append((5, L, encode(tc)))
    body = encode(core)
    return struct.pack('<III', ic.IMG_COMMON_MAGIC, ic.CORE_MAGIC, len(body)) + body


def read(tmp_path: Path, files: dict[str, bytes]) -> list[ic.ThreadCreds]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return ic.image_credentials(fd, sorted(files))
    finally:
        os.close(fd)


def test_plain_creds_are_read(tmp_path: Path) -> None:
    [c] = read(tmp_path, {'core-2.img': core_img(encode(creds()))})
    assert c.uids == (5000,) * 4 and c.gids == (5000,) * 4 and c.groups == (7000,)
    assert ic.credentials_problem([c], 5000, 5000, [7000]) is None
    assert 'uids' in ic.credentials_problem([c], 5001, 5000, [7000])
    assert 'groups' in ic.credentials_problem([c], 5000, 5000, [])
    packed = encode([f for f in creds() if f[0] != 14] + [(14, L, varint(7000))])
    assert read(tmp_path, {'core-3.img': core_img(packed)})[0].groups == (7000,)


def test_capabilities_are_wrong_credentials(tmp_path: Path) -> None:
    c = read(tmp_path, {'core-2.img': core_img(encode(creds(caps=1 << 21)))})
    assert 'cap_inh' in ic.credentials_problem(c, 5000, 5000, [7000])


@pytest.mark.parametrize('fields, why', [
    ([(1, V, 1 << 32)] + creds()[1:], 'uid is not a uint32'),  # protobuf-c would read uid 0
    (creds() + [(1, V, 0)], 'uid appears twice'),  # protobuf-c keeps the last
    ([(1, L, b'\x00')] + creds()[1:], 'uid has wire type 2'),
    (creds()[1:], 'without uid'),
    (creds() + [(15, 3, 0)], 'unsupported wire type 3'),
])
def test_ambiguous_creds_are_refused(tmp_path: Path, fields, why: str) -> None:
    with pytest.raises(ic.CredsFormatError, match=why):
        read(tmp_path, {'core-2.img': core_img(encode(fields))})


def test_structure_is_checked(tmp_path: Path) -> None:
    good = encode(creds())
    twice = core_img(good)
    body = ic.first_entry(twice, ic.CORE_MAGIC, 'x') + encode([(5, L, encode([(10, L, good)]))])
    twice = struct.pack('<III', ic.IMG_COMMON_MAGIC, ic.CORE_MAGIC, len(body)) + body
    cases = {'thread_core appears twice': twice,
             'truncated entry': core_img(good)[:-3],
             'not a CRIU image': b'\x00' * 16,
             'records no credentials and is not a zombie': core_img(None, state=1),
             'no credentials and is not': core_img(None, thread=False)}
    for why, data in cases.items():
        with pytest.raises(ic.CredsFormatError, match=why):
            read(tmp_path, {'core-2.img': data})
    with pytest.raises(ic.CredsFormatError, match='no live thread'):
        read(tmp_path, {'core-2.img': core_img(None, state=ic.TASK_DEAD, thread=False)})
    # A zombie beside a live thread is fine: CRIU restores it as an exit status, nothing runs.
    got = read(tmp_path, {'core-2.img': core_img(good), 'core-9.img': core_img(None, state=2)})
    assert [c.source for c in got] == ['core-2.img']
    # A legacy creds file is checked too.
    legacy = struct.pack('<III', ic.IMG_COMMON_MAGIC, ic.CREDS_MAGIC, len(encode(creds(uid=0))))
    got = read(tmp_path, {'core-2.img': core_img(good), 'creds-2.img': legacy + encode(creds(uid=0))})
    assert 'creds-2.img has uids [0' in ic.credentials_problem(got, 5000, 5000, [7000])


def manifest_doc() -> dict:
    return {'format': 1, 'id': 'i0123456789abcdef', 'owner': {'vo': 'dev', 'user': 'bob'},
            'uid': 5000, 'gid': 5000, 'command': ['sh'], 'job_id': None, 'node': 'n',
            'created': 1.5, 'criu_version': '4.1.1', 'signer': 'SHA256:x',
            'files': {'core-2.img': {'size': 3, 'sha256': '0' * 64}}}


@pytest.mark.parametrize('edit, why', [
    (lambda t: t.replace('"uid":5000', '"uid":5000,"uid":0'), 'duplicate key'),
    (lambda t: t.replace('"created":1.5', '"created":NaN'), 'NaN is not allowed'),
    (lambda t: t.replace('"node":"n"', '"node":"n","extra":1'), 'unknown fields'),
    (lambda t: t.replace('core-2.img', '../core-2.img'), 'not an image file name'),
    (lambda t: t.replace('core-2.img', 'manifest.sig'), 'not an image file name'),
    (lambda t: t.replace('"uid":5000', '"uid":true'), 'uid must be an integer'),
    (lambda t: t.replace('"uid":5000', '"uid":4294967296'), 'uid must be an integer'),
    (lambda t: t.replace('"format":1', '"format":2'), 'format 2'),
    (lambda t: t.replace('"size":3', '"size":-1'), 'size must be a size'),
    (lambda t: '[' + t + ']', 'not a JSON object'),
    (lambda t: t.replace('"bob"', '"b\udcff"'), 'not valid JSON'),  # not UTF-8
])
def test_manifest_parsing_is_strict(edit, why: str) -> None:
    text = json.dumps(manifest_doc(), sort_keys=True, separators=(',', ':'))
    assert parse_manifest(text.encode()).owner.user == 'bob'
    with pytest.raises(ImageError) as exc:
        parse_manifest(edit(text).encode('utf-8', errors='surrogateescape'))
    assert exc.value.reason == 'bad-archive' and why in str(exc.value)


def test_signature_binds_the_signer(tmp_path: Path) -> None:
    key = load_or_create_node_key(tmp_path, 'n')
    doc = manifest_doc()
    doc['signer'] = key.fingerprint
    data = json.dumps(doc).encode()
    trusted = {key.fingerprint: key.public}
    assert verify(trusted, data, sign(key, data)).signer == key.fingerprint
    (tmp_path / 'o').mkdir()
    other = load_or_create_node_key(tmp_path / 'o', 'o')
    doc['signer'] = other.fingerprint  # claims another signer than the key that signed
    data2 = json.dumps(doc).encode()
    with pytest.raises(ImageError) as exc:
        verify({**trusted, other.fingerprint: other.public}, data2, sign(key, data2))
    assert exc.value.reason == 'bad-signature'
    sig = json.loads(sign(key, data))
    sig['sig'] = sig['sig'][:-4] + 'AAA='
    with pytest.raises(ImageError) as exc:
        verify(trusted, data, json.dumps(sig).encode())
    assert exc.value.reason == 'bad-signature'
    with pytest.raises(ImageError) as exc:
        verify({}, data, sign(key, data))
    assert exc.value.reason == 'untrusted-node'
