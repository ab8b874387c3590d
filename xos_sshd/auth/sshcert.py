"""OpenSSH user certificates with the XOS extensions: minting and strict reading.

Minting uses asyncssh's own OpenSSH v01 certificate encoder and the CA key's asyncssh signer; we
only add the value-bearing ``vo@xos``/``groups@xos``/``role@xos`` extensions, which asyncssh
neither writes nor keeps when decoding. Extensions are emitted in lexical order, as
``ssh-keygen`` does and OpenSSH expects.

Reading walks the wire format once ourselves (asyncssh drops unknown extensions and keeps serial,
key id and validity private), then has asyncssh decode the same blob, which checks the structure
and the CA's signature over it. Which CA that signature belongs to is the verifier's business.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import asyncssh
from asyncssh.public_key import CERT_TYPE_HOST, CERT_TYPE_USER, SSHOpenSSHCertificate
from asyncssh.public_key import SSHOpenSSHCertificateV01, decode_ssh_certificate, decode_ssh_public_key

from .errors import AuthRefused
from .profile import SSH_EXT_GROUPS, SSH_EXT_ROLE, SSH_EXT_VO, encode_ssh_extension_data

__all__ = [
    "CERT_TYPE_HOST",
    "CERT_TYPE_USER",
    "DEFAULT_PERMITS",
    "OpenSSHCert",
    "build_user_certificate",
    "export_certificate_line",
    "parse_certificate",
    "read_certificate_file",
]

#: The flag extensions we grant, as ``ssh-keygen -s`` does by default.
DEFAULT_PERMITS: Final[tuple[str, ...]] = (
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
)

#: CA signature algorithms we accept on a certificate (``ssh-rsa`` = SHA-1 is refused, as
#: OpenSSH >= 8.2 does by default).
ACCEPTED_SIGNATURE_ALGORITHMS: Final[frozenset[str]] = frozenset(
    {
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-ed25519",
        "rsa-sha2-256",
        "rsa-sha2-512",
    }
)

_CERT_SUFFIX: Final = "-cert-v01@openssh.com"
#: How many length-prefixed public-key fields follow the nonce, per certificate algorithm.
_KEY_FIELDS: Final[Mapping[str, int]] = {
    "ssh-rsa" + _CERT_SUFFIX: 2,
    "rsa-sha2-256" + _CERT_SUFFIX: 2,
    "rsa-sha2-512" + _CERT_SUFFIX: 2,
    "ssh-dss" + _CERT_SUFFIX: 4,
    "ecdsa-sha2-nistp256" + _CERT_SUFFIX: 2,
    "ecdsa-sha2-nistp384" + _CERT_SUFFIX: 2,
    "ecdsa-sha2-nistp521" + _CERT_SUFFIX: 2,
    "ssh-ed25519" + _CERT_SUFFIX: 1,
    "ssh-ed448" + _CERT_SUFFIX: 1,
    "sk-ecdsa-sha2-nistp256" + _CERT_SUFFIX: 3,
    "sk-ssh-ed25519" + _CERT_SUFFIX: 2,
}


def _text_encoder(value: object) -> bytes:
    return encode_ssh_extension_data(value if isinstance(value, bytes) else str(value))


class _XOSUserCertV01(SSHOpenSSHCertificateV01):
    """asyncssh's v01 certificate with the XOS extensions added to the user encoders."""

    _user_extension_encoders = tuple(
        sorted(
            tuple(SSHOpenSSHCertificateV01._user_extension_encoders)
            + tuple((name, _text_encoder) for name in (SSH_EXT_GROUPS, SSH_EXT_ROLE, SSH_EXT_VO)),
            key=lambda item: item[0].encode("ascii"),
        )
    )


def build_user_certificate(
    ca_key: asyncssh.SSHKey,
    user_key: asyncssh.SSHKey,
    *,
    serial: int,
    key_id: str,
    principals: Sequence[str],
    valid_after: int,
    valid_before: int,
    xos_extensions: Mapping[str, str | bytes],
    permits: Sequence[str] = DEFAULT_PERMITS,
    comment: str | None = None,
) -> bytes:
    """Sign an OpenSSH user certificate for ``user_key`` with ``ca_key``; return the wire blob.

    ``xos_extensions`` maps ``vo@xos``/``groups@xos``/``role@xos`` to their (already checked)
    text; ``valid_after``/``valid_before`` are POSIX seconds.
    """
    unknown = set(xos_extensions) - {SSH_EXT_VO, SSH_EXT_GROUPS, SSH_EXT_ROLE}
    if unknown:
        raise ValueError(f"unsupported extension(s): {', '.join(sorted(unknown))}")
    options: dict[str, object] = {name: True for name in permits}
    options.update(xos_extensions)
    algorithm = user_key.algorithm + _CERT_SUFFIX.encode("ascii")
    cert = _XOSUserCertV01.generate(
        ca_key,
        algorithm,
        user_key,
        serial,
        CERT_TYPE_USER,
        key_id,
        list(principals),
        valid_after,
        valid_before,
        options,
        ca_key.sig_algorithms[0],
        comment.encode("utf-8") if comment else None,
    )
    return bytes(cert.public_data)


def export_certificate_line(blob: bytes, comment: str | None = None) -> bytes:
    """The ``-cert.pub`` file line: ``ALGORITHM BASE64 [COMMENT]\\n``."""
    algorithm = _Reader(blob, "certificate").string().decode("ascii")
    parts = [algorithm.encode("ascii"), base64.b64encode(blob)]
    if comment:
        parts.append(comment.encode("utf-8"))
    return b" ".join(parts) + b"\n"


def read_certificate_file(data: bytes) -> bytes:
    """Return the certificate blob from the text of a ``-cert.pub`` file (first key line)."""
    for line in data.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith(b"#"):
            continue
        if len(fields) < 2:
            break
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise AuthRefused("bad-encoding", "OpenSSH certificate: bad base64") from None
        if _Reader(blob, "OpenSSH certificate").string() != fields[0]:
            raise AuthRefused("bad-encoding", "OpenSSH certificate: algorithm name mismatch")
        return blob
    raise AuthRefused("bad-encoding", "not an OpenSSH certificate file")


class _Reader:
    """Minimal SSH wire-format reader that refuses truncation with ``bad-encoding``."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise AuthRefused("bad-encoding", f"{self._what}: truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def uint64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def string(self) -> bytes:
        return self._take(self.uint32())

    def text(self, label: str) -> str:
        try:
            return self.string().decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise AuthRefused("bad-encoding", f"{self._what}: {label} is not valid UTF-8") from None

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def end(self) -> None:
        if not self.at_end():
            raise AuthRefused("bad-encoding", f"{self._what}: trailing data")


def _options(data: bytes, what: str) -> dict[str, bytes]:
    """Decode a critical-options or extensions section; duplicates are refused."""
    reader = _Reader(data, what)
    out: dict[str, bytes] = {}
    while not reader.at_end():
        name = reader.text("option name")
        value = reader.string()
        if name in out:
            raise AuthRefused("invalid-attributes", f"{what}: duplicate {name!r}")
        out[name] = value
    return out


@dataclass(frozen=True)
class OpenSSHCert:
    """A decoded OpenSSH certificate whose signature verified against its *embedded* CA key.

    ``ca_key_blob`` is the SSH wire blob of that CA key: callers must still check it is a CA
    they trust. ``key`` is the certified public key (asyncssh), ``key_blob`` its wire blob.
    """

    blob: bytes
    algorithm: str
    key: asyncssh.SSHKey
    key_blob: bytes
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: Mapping[str, bytes]
    extensions: Mapping[str, bytes]
    ca_key_blob: bytes
    signature_algorithm: str


def _signature_verifies(ca_key_blob: bytes, signed: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``signed`` verifies with the SSH key ``ca_key_blob``."""
    try:
        return bool(decode_ssh_public_key(ca_key_blob).verify(signed, signature))
    except Exception:  # malformed key or signature encodings
        return False


def parse_certificate(blob: bytes) -> OpenSSHCert:
    """Strictly decode an OpenSSH certificate blob and verify its self-contained signature.

    Raises ``AuthRefused``: ``bad-encoding`` for anything malformed (including X.509 blobs and
    unknown algorithms), ``invalid-attributes`` for duplicate options, ``bad-signature`` when
    the signature does not verify with the embedded CA key.
    """
    what = "OpenSSH certificate"
    r = _Reader(blob, what)
    try:
        algorithm = r.string().decode("ascii")
    except UnicodeDecodeError:
        raise AuthRefused("bad-encoding", f"{what}: bad algorithm name") from None
    fields = _KEY_FIELDS.get(algorithm)
    if fields is None:
        raise AuthRefused("bad-encoding", f"{what}: unsupported algorithm {algorithm[:64]!r}")
    r.string()  # nonce
    for _ in range(fields):
        r.string()
    serial = r.uint64()
    cert_type = r.uint32()
    key_id = r.text("key id")
    principal_reader = _Reader(r.string(), f"{what} principals")
    principals: list[str] = []
    while not principal_reader.at_end():
        principals.append(principal_reader.text("principal"))
    valid_after = r.uint64()
    valid_before = r.uint64()
    critical = _options(r.string(), f"{what} critical options")
    extensions = _options(r.string(), f"{what} extensions")
    r.string()  # reserved
    ca_key_blob = r.string()
    signed = blob[: len(blob) - r.remaining()]
    signature = r.string()
    try:
        signature_algorithm = _Reader(signature, f"{what} signature").string().decode("ascii")
    except UnicodeDecodeError:
        raise AuthRefused("bad-encoding", f"{what}: bad signature algorithm name") from None
    r.end()

    try:
        cert = decode_ssh_certificate(blob)  # checks structure and the embedded CA's signature
    except Exception:  # KeyImportError, or anything hostile input may provoke
        # asyncssh reports every failure, a bad signature included, as "Invalid OpenSSH
        # certificate": check the signature ourselves to give the right reason.
        if not _signature_verifies(ca_key_blob, signed, signature):
            raise AuthRefused("bad-signature", f"{what}: CA signature does not verify") from None
        unknown = sorted(set(critical) - {"force-command", "source-address"})
        if unknown:
            raise AuthRefused("invalid-attributes", f"{what}: unsupported critical option(s): {', '.join(unknown)}") from None
        raise AuthRefused("bad-encoding", f"{what}: not a valid OpenSSH certificate") from None
    if not isinstance(cert, SSHOpenSSHCertificate) or list(cert.principals) != principals:
        raise AuthRefused("bad-encoding", f"{what}: not an OpenSSH certificate")
    return OpenSSHCert(
        blob=bytes(blob),
        algorithm=algorithm,
        key=cert.key,
        key_blob=bytes(cert.key.public_data),
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=critical,
        extensions=extensions,
        ca_key_blob=ca_key_blob,
        signature_algorithm=signature_algorithm,
    )
