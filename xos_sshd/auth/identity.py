"""The authenticated VO identity: the one value every login route produces.

An X.509 XOS-cert and the OpenSSH user certificate minted for the same key by the same CA must
yield an *equal* :class:`VOIdentity`, so that account mapping (ams) cannot tell the routes apart.
That is why the key fingerprint is computed from the SSH wire encoding of the user's public key in
both cases, and ``issuer`` is always the trusted CA certificate's subject, never a string taken
from the presented credential.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


@dataclass(frozen=True)
class VOIdentity:
    """Who logged in, as vouched for by a VO CA.

    ``groups``: primary group first, then the secondary groups, de-duplicated, order preserved.
    ``not_after``: end of the credential's validity, timezone-aware UTC.
    ``issuer``: the trusted CA's subject (RFC 4514).
    ``key_fingerprint``: OpenSSH-style ``SHA256:<base64>`` of the user's public key.
    """

    vo: str
    user: str
    groups: tuple[str, ...]
    role: str | None
    serial: int
    not_after: datetime
    issuer: str
    key_fingerprint: str


def ssh_fingerprint(ssh_public_key_blob: bytes) -> str:
    """Return the OpenSSH ``SHA256:...`` fingerprint of an SSH wire-format public key blob.

    Matches ``ssh-keygen -l``: unpadded base64 of the SHA-256 of the key blob.
    """
    digest = hashlib.sha256(ssh_public_key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def ssh_public_blob(public_key: PublicKeyTypes) -> bytes:
    """Return the SSH wire encoding of a cryptography public key (RSA, EC or Ed25519).

    Raises ``ValueError`` for key types OpenSSH cannot represent.
    """
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def key_fingerprint(public_key: PublicKeyTypes) -> str:
    """Return the OpenSSH ``SHA256:...`` fingerprint of a cryptography public key."""
    return ssh_fingerprint(ssh_public_blob(public_key))


def dedupe(names: "tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """Return ``names`` without repeats, keeping the first occurrence's position."""
    return tuple(dict.fromkeys(names))
