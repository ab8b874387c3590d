"""Image manifests and their signatures: what an image is, who vouches for it.

Every stored image (design: "Checkpoint / restart") carries ``manifest.json``::

    {"format": 1, "id": "i...", "owner": {"vo": "...", "user": "..."}, "uid": N, "gid": N,
     "command": ["..."], "job_id": "j..." | null, "node": "...", "created": 1700000000.5,
     "criu_version": "4.1.1", "signer": "SHA256:...",
     "files": {"core-2.img": {"size": N, "sha256": "<64 hex>"}, ...}}

written canonically (sorted keys, no spaces, ASCII), and ``manifest.sig``::

    {"format": 1, "alg": "ssh-ed25519", "key": "SHA256:...", "sig": "<base64 of 64 bytes>"}

an Ed25519 signature over the *exact bytes* of ``manifest.json`` by the node image key whose
OpenSSH fingerprint is ``key`` (repeated as the manifest's ``signer``, so it is signed too).
``id`` and ``node`` are where the image was taken: an imported image keeps them (and the
signature) as provenance and gets a new local id.  ``uid``/``gid`` are the account's on the
node that took it; what a restore really checks is the credentials inside the CRIU files
(:mod:`xos_sshd.cr.imagecreds`).

Parsing is strict because the bytes may come from anyone (an uploaded archive): UTF-8 JSON
with no duplicate keys, no NaN/Infinity, exactly the known fields with the right types, safe
file names, bounded sizes.  Node keys: ``STATE/image_key`` (PKCS#8 PEM, 0600, made on first
use) and ``STATE/image_key.pub`` (one OpenSSH line, ``ssh-ed25519 AAAA... xos-image@NODE``).
Trusted node keys are files in that same one-line OpenSSH format (a copy of another node's
``image_key.pub``), or the line itself.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..auth.identity import key_fingerprint
from ..fsutil import atomic_write

FORMAT = 1
MANIFEST = 'manifest.json'
SIGNATURE = 'manifest.sig'
RESERVED = frozenset({MANIFEST, SIGNATURE, '.', '..'})
#: Image file names: what CRIU writes (core-2.img, pages-1.img, stats-dump, ...).  At most
#: 100 bytes: a plain ustar header holds that much, and archives with long-name extension
#: headers (pax, GNU) are refused.
NAME_RE = re.compile(r'^[A-Za-z0-9._-]{1,100}\Z')
#: Image ids (local and original): what ``'i' + secrets.token_hex(8)`` gives, and a bit more.
ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z')
MAX_FILES = 10000
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 4096
MAX_TEXT = 4096
SIG_ALG = 'ssh-ed25519'
KEY_FILE = 'image_key'

_MANIFEST_KEYS = {'format', 'id', 'owner', 'uid', 'gid', 'command', 'job_id', 'node', 'created',
                  'criu_version', 'signer', 'files'}
_SIG_KEYS = {'format', 'alg', 'key', 'sig'}


class ImageError(Exception):
    """An image operation was refused.  ``reason`` is a stable code: ``no-such-image`` (also
    for another account's image), ``bad-archive``, ``bad-signature``, ``untrusted-node``,
    ``tampered``, ``not-owner``, ``wrong-credentials``, ``quota-exceeded``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Owner:
    """Who an image belongs to: the VO identity, not the local uid."""

    vo: str
    user: str


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` (see the module docstring)."""

    id: str
    owner: Owner
    uid: int
    gid: int
    command: tuple[str, ...]
    job_id: str | None
    node: str
    created: float
    criu_version: str
    signer: str
    files: Mapping[str, FileEntry]

    def to_bytes(self) -> bytes:
        """The canonical encoding (what gets signed)."""
        doc = {'format': FORMAT, 'id': self.id,
               'owner': {'vo': self.owner.vo, 'user': self.owner.user}, 'uid': self.uid,
               'gid': self.gid, 'command': list(self.command), 'job_id': self.job_id,
               'node': self.node, 'created': self.created, 'criu_version': self.criu_version,
               'signer': self.signer,
               'files': {n: {'size': f.size, 'sha256': f.sha256}
                         for n, f in sorted(self.files.items())}}
        return json.dumps(doc, sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                          allow_nan=False).encode()

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def valid_name(name: str) -> bool:
    """Whether *name* may be an image file (no path, no dot names, not a manifest name)."""
    return bool(NAME_RE.match(name)) and name not in RESERVED


# -- strict JSON ----------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f'duplicate key {key!r}')
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f'{name} is not allowed')


def strict_json(data: bytes, limit: int, what: str) -> dict[str, Any]:
    """Parse *data* as one JSON object, refusing anything ambiguous (ImageError bad-archive)."""
    if len(data) > limit:
        raise ImageError('bad-archive', f'{what} is larger than {limit} bytes')
    try:
        doc = json.loads(data.decode('utf-8', errors='strict'), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImageError('bad-archive', f'{what} is not valid JSON: {exc}') from None
    if not isinstance(doc, dict):
        raise ImageError('bad-archive', f'{what} is not a JSON object')
    return doc


def _fields(doc: Mapping[str, Any], keys: set[str], what: str) -> None:
    if set(doc) != keys:
        extra, missing = sorted(set(doc) - keys), sorted(keys - set(doc))
        raise ImageError('bad-archive', f'{what}: unknown fields {extra}, missing {missing}')


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not value and not empty) \
            or '\0' in value:
        raise ImageError('bad-archive', f'manifest: {what} must be a non-empty string')
    return value


def _uint32(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ImageError('bad-archive', f'manifest: {what} must be an integer id')
    return value


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check ``manifest.json`` bytes (ImageError ``bad-archive`` when malformed)."""
    doc = strict_json(data, MAX_MANIFEST_BYTES, MANIFEST)
    _fields(doc, _MANIFEST_KEYS, MANIFEST)
    if doc['format'] != FORMAT or isinstance(doc['format'], bool):
        raise ImageError('bad-archive', f'manifest format {doc["format"]!r} is not {FORMAT}')
    image_id = _text(doc['id'], 'id')
    if not ID_RE.match(image_id):
        raise ImageError('bad-archive', f'manifest: id {image_id!r} is not an image id')
    owner = doc['owner']
    if not isinstance(owner, dict):
        raise ImageError('bad-archive', 'manifest: owner must be an object')
    _fields(owner, {'vo', 'user'}, 'manifest owner')
    command = doc['command']
    if not isinstance(command, list) or len(command) > MAX_FILES:
        raise ImageError('bad-archive', 'manifest: command must be a list of strings')
    job_id = doc['job_id']
    created = doc['created']
    if isinstance(created, bool) or not isinstance(created, (int, float)) \
            or not math.isfinite(created) or created < 0:
        raise ImageError('bad-archive', 'manifest: created must be a time')
    files = doc['files']
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise ImageError('bad-archive', f'manifest: files must be an object of at most '
                         f'{MAX_FILES} entries')
    entries: dict[str, FileEntry] = {}
    for name, entry in files.items():
        if not valid_name(name):
            raise ImageError('bad-archive', f'manifest: {name!r} is not an image file name')
        if not isinstance(entry, dict):
            raise ImageError('bad-archive', f'manifest: files[{name!r}] must be an object')
        _fields(entry, {'size', 'sha256'}, f'manifest files[{name!r}]')
        size, digest = entry['size'], entry['sha256']
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ImageError('bad-archive', f'manifest: files[{name!r}].size must be a size')
        if not isinstance(digest, str) or not re.fullmatch(r'[0-9a-f]{64}', digest):
            raise ImageError('bad-archive', f'manifest: files[{name!r}].sha256 must be 64 hex')
        entries[name] = FileEntry(size, digest)
    return Manifest(
        id=image_id, owner=Owner(_text(owner['vo'], 'owner.vo'), _text(owner['user'], 'owner.user')),
        uid=_uint32(doc['uid'], 'uid'), gid=_uint32(doc['gid'], 'gid'),
        command=tuple(_text(c, 'command[]', empty=True) for c in command),
        job_id=None if job_id is None else _text(job_id, 'job_id'),
        node=_text(doc['node'], 'node', empty=True), created=float(created),
        criu_version=_text(doc['criu_version'], 'criu_version', empty=True),
        signer=_text(doc['signer'], 'signer'), files=entries)


# -- keys -----------------------------------------------------------------------------------

def public_line(key: ed25519.Ed25519PublicKey, comment: str = '') -> str:
    """The OpenSSH one-line form of *key*."""
    line = key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()
    return f'{line} {comment}'.rstrip()


def parse_public_key(text: str, where: str) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from one OpenSSH line (``ssh-ed25519 AAAA... [comment]``);
    ValueError naming *where* otherwise."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith('#')]
    if len(lines) != 1:
        raise ValueError(f'{where}: expected one "ssh-ed25519 AAAA..." line, found {len(lines)}')
    parts = lines[0].split()
    if len(parts) < 2 or parts[0] != SIG_ALG:
        raise ValueError(f'{where}: not an OpenSSH ssh-ed25519 public key')
    try:
        key = serialization.load_ssh_public_key(f'{parts[0]} {parts[1]}'.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f'{where}: not an OpenSSH ssh-ed25519 public key ({exc})') from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise ValueError(f'{where}: not an Ed25519 key')


def load_trusted_keys(sources: Sequence[Path | str]) -> dict[str, ed25519.Ed25519PublicKey]:
    """``{fingerprint: key}`` for each source: a path to a one-line OpenSSH public key file,
    or (a str starting ``ssh-ed25519 ``) the line itself.  ValueError naming a bad one."""
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for source in sources:
        if isinstance(source, str) and source.startswith(SIG_ALG + ' '):
            key = parse_public_key(source, 'trusted key')
        else:
            try:
                text = Path(source).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f'{source}: cannot read: {getattr(exc, "strerror", exc)}') from None
            key = parse_public_key(text, str(source))
        keys[key_fingerprint(key)] = key
    return keys


@dataclass(frozen=True)
class NodeKey:
    """This node's image signing key."""

    private: ed25519.Ed25519PrivateKey
    fingerprint: str
    public_line: str

    @property
    def public(self) -> ed25519.Ed25519PublicKey:
        return self.private.public_key()


def load_or_create_node_key(state_dir: Path, node_name: str) -> NodeKey:
    """``STATE/image_key`` (created 0600 with its ``.pub`` on first use; an existing key file
    must be a regular file of this user, unreadable to others, or ValueError)."""
    path = state_dir / KEY_FILE
    if not path.exists():
        new = ed25519.Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            atomic_write(path, pem, 0o600, overwrite=False)
        except FileExistsError:
            pass  # made by a concurrent first start: use that one
    st = os.lstat(path)
    if not os.path.isfile(path) or os.path.islink(path) or st.st_uid != os.geteuid() \
            or st.st_mode & 0o077:
        raise ValueError(f'{path}: the image key must be a regular file of uid {os.geteuid()} '
                         'not accessible to others (mode 0600)')
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f'{path}: not a PEM private key ({exc})') from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f'{path}: not an Ed25519 key')  # noqa: TRY004 (a bad file, not a bad call)
    line = public_line(key.public_key(), f'xos-image@{node_name}' if node_name else 'xos-image')
    pub = state_dir / (KEY_FILE + '.pub')
    try:
        current = pub.read_text().split()[:2]
    except OSError:
        current = []
    if current != line.split()[:2]:
        atomic_write(pub, (line + '\n').encode(), 0o644)
    return NodeKey(key, key_fingerprint(key.public_key()), line)


# -- signatures -----------------------------------------------------------------------------

def sign(key: NodeKey, manifest_bytes: bytes) -> bytes:
    """``manifest.sig`` for *manifest_bytes*."""
    doc = {'format': FORMAT, 'alg': SIG_ALG, 'key': key.fingerprint,
           'sig': base64.b64encode(key.private.sign(manifest_bytes)).decode()}
    return json.dumps(doc, sort_keys=True, separators=(',', ':')).encode()


def verify(trusted: Mapping[str, ed25519.Ed25519PublicKey], manifest_bytes: bytes,
           signature: bytes | None) -> Manifest:
    """Check *signature* over *manifest_bytes* with a *trusted* key, then parse the manifest.

    ``bad-signature``: no signature, a malformed one, or one that does not verify (a single
    changed manifest byte); ``untrusted-node``: well-formed but by a key not trusted here;
    ``bad-archive``: a correctly signed but malformed manifest.
    """
    if signature is None:
        raise ImageError('bad-signature', f'the image has no {SIGNATURE}: unsigned')
    try:
        doc = strict_json(signature, MAX_SIGNATURE_BYTES, SIGNATURE)
        _fields(doc, _SIG_KEYS, SIGNATURE)
    except ImageError as exc:
        raise ImageError('bad-signature', exc.message) from None
    if doc['format'] != FORMAT or doc['alg'] != SIG_ALG or not isinstance(doc['key'], str) \
            or not isinstance(doc['sig'], str):
        raise ImageError('bad-signature', f'{SIGNATURE}: not a format {FORMAT} {SIG_ALG} signature')
    try:
        raw = base64.b64decode(doc['sig'], validate=True)
    except ValueError:
        raise ImageError('bad-signature', f'{SIGNATURE}: signature is not base64') from None
    key = trusted.get(doc['key'])
    if key is None:
        raise ImageError('untrusted-node', f'signed by node key {doc["key"][:60]}, which this '
                         'node does not trust (add its image_key.pub to [images] '
                         'trusted_node_keys)')
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise ImageError('bad-signature', f'the manifest signature by {doc["key"]} does not '
                         'verify: the manifest was changed after signing') from None
    manifest = parse_manifest(manifest_bytes)
    if manifest.signer != doc['key']:
        raise ImageError('bad-signature', f'manifest signer {manifest.signer} is not the '
                         f'signing key {doc["key"]}')
    return manifest
