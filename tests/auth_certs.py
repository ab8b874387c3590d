"""Certificate factories for the auth tests.

Every refusal class gets a *real* certificate built for it: signed by a real CA key, with exactly
one thing wrong. Nothing is mocked. The DER-surgery helpers build what cryptography refuses to
build (a certificate carrying the same extension twice) and re-sign it, so the duplicate is the
only fault.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xos_sshd.auth import sshcert
from xos_sshd.auth.ca import CertificateAuthority, init_ca, new_serial
from xos_sshd.auth.errors import AuthRefused
from xos_sshd.auth.profile import XOSAttributes
from xos_sshd.auth.verifier import Verifier, VOTrust



@contextmanager
def refused(reason: str, *fragments: str) -> Iterator[pytest.ExceptionInfo[AuthRefused]]:
    """Expect an ``AuthRefused`` with ``reason`` whose message contains every fragment."""
    with pytest.raises(AuthRefused) as info:
        yield info
    assert info.value.reason == reason, (info.value.reason, str(info.value))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


XOSExt = tuple[x509.ObjectIdentifier, bytes, bool]  # (oid, DER value, critical)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def make_ca(base: Path, vo: str = "dev", *, name: str | None = None, key=None, days: int = 3650, now=None) -> CertificateAuthority:
    """A fresh CA for ``vo`` in ``base/<name or vo>``."""
    return init_ca(base / (name or vo), vo, days=days, key=key, now=now)


def trust(ca: CertificateAuthority, *, crl_required: bool = True, vo: str | None = None) -> VOTrust:
    return VOTrust(vo or ca.vo, ca.paths.cert, ca.paths.crl, crl_required=crl_required)


def verifier(*cas: CertificateAuthority, crl_required: bool = True) -> Verifier:
    return Verifier([trust(ca, crl_required=crl_required) for ca in cas])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def xos_exts(attrs: XOSAttributes) -> list[XOSExt]:
    """The XOS extensions exactly as ca.py writes them, as editable (oid, der, critical) tuples."""
    return [(e.oid, e.value, False) for e in attrs.to_extensions()]


def make_leaf(
    ca: CertificateAuthority,
    *,
    user: str | None = "alice",
    vo: str | None = None,
    groups: Sequence[str] = ("users", "staff"),
    role: str | None = "worker",
    key=None,
    serial: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    cn: str | None | bool = True,
    xos: list[XOSExt] | None = None,
    key_usage: bool | None = True,
    eku: list[x509.ObjectIdentifier] | None = None,
    basic_ca: bool = False,
    sign_hash: hashes.HashAlgorithm | None = None,
    signer_key=None,
) -> tuple[x509.Certificate, object]:
    """An XOS-cert signed by ``ca`` (or by ``signer_key`` under ``ca``'s name).

    ``xos`` replaces the XOS extensions entirely; ``cn=True`` repeats the user, a string sets
    the CN, ``None``/False omits it. ``key_usage``: True = digitalSignature, False = only
    keyEncipherment, None = absent. ``eku`` defaults to [clientAuth]; [] means absent.
    """
    vo = ca.vo if vo is None else vo
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = not_before or now_utc() - timedelta(minutes=1)
    end = not_after or start + timedelta(hours=24)
    if xos is None:
        attrs = XOSAttributes(
            primary_vo=vo,
            user_id=user,
            primary_group=groups[0] if groups else None,
            secondary_groups=tuple(groups[1:]),
            role=role,
        )
        xos = xos_exts(attrs)
    rdns = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, vo)]
    cn_value = user if cn is True else (cn or None)
    if cn_value:
        rdns.append(x509.NameAttribute(NameOID.COMMON_NAME, cn_value))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(rdns))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or new_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=basic_ca, path_length=None), critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=key_usage,
                content_commitment=False,
                key_encipherment=not key_usage,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if eku is None else eku
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    for oid, value, critical in xos:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=critical)
    signer = signer_key or ca.key
    return builder.sign(signer, sign_hash or hashes.SHA256()), key


# --- DER surgery --------------------------------------------------------------------------------


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, header length, content length) of the DER element at ``pos``."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, 2, first
    n = first & 0x7F
    return tag, 2 + n, int.from_bytes(data[pos + 2 : pos + 2 + n], "big")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def split_certificate(cert_der: bytes) -> tuple[bytes, bytes, bytes]:
    """Certificate DER -> (tbsCertificate, signatureAlgorithm, signatureValue) elements."""
    _, hdr, _ = _tlv(cert_der, 0)
    parts = []
    pos = hdr
    for _ in range(3):
        _, h, n = _tlv(cert_der, pos)
        parts.append(cert_der[pos : pos + h + n])
        pos += h + n
    return parts[0], parts[1], parts[2]


def resign(cert_der: bytes, new_tbs: bytes, ca_key, hash_alg=None, alg: bytes | None = None) -> bytes:
    """Re-assemble a certificate around ``new_tbs``, signed by ``ca_key`` (ECDSA/RSA).

    ``hash_alg`` defaults to SHA-256; ``alg`` replaces the outer signatureAlgorithm element.
    """
    hash_alg = hash_alg or hashes.SHA256()
    alg = alg or split_certificate(cert_der)[1]
    if isinstance(ca_key, rsa.RSAPrivateKey):
        sig = ca_key.sign(new_tbs, padding.PKCS1v15(), hash_alg)
    else:
        sig = ca_key.sign(new_tbs, ec.ECDSA(hash_alg))
    bitstring = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    body = new_tbs + alg + bitstring
    return b"\x30" + _der_len(len(body)) + body


def with_duplicate_extension(ca: CertificateAuthority, oid_number: int = 3, user: str = "alice") -> bytes:
    """A correctly signed certificate carrying XOS extension ``.oid_number`` twice.

    Built with a placeholder OID ``1.34.5.0.14.9`` of the same encoded length, which is then
    renamed inside the TBS bytes, so the TBS stays well-formed; the result is re-signed by the CA.
    """
    attrs = XOSAttributes(primary_vo=ca.vo, user_id=user, primary_group="users")
    extra = (x509.ObjectIdentifier("1.34.5.0.14.9"), b"\x04\x07mallory", False)
    cert, _ = make_leaf(ca, user=user, xos=xos_exts(attrs) + [extra])
    tbs, _, _ = split_certificate(der(cert))
    placeholder, target = bytes.fromhex("06054a05000e09"), bytes.fromhex("06054a05000e") + bytes([oid_number])
    assert tbs.count(placeholder) == 1
    return resign(der(cert), tbs.replace(placeholder, target), ca.key)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


# --- OpenSSH certificates -----------------------------------------------------------------------


def ssh_key_of(private_key) -> asyncssh.SSHKey:
    """asyncssh public key for a cryptography private key."""
    return asyncssh.import_public_key(
        private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


def make_ssh_cert(
    ca: CertificateAuthority,
    user_key=None,
    *,
    signer: asyncssh.SSHKey | None = None,
    serial: int | None = None,
    key_id: str = "alice@dev",
    principals: Sequence[str] = ("alice",),
    valid_after: datetime | None = None,
    valid_before: datetime | None = None,
    ext: dict[str, str | bytes] | None = None,
) -> bytes:
    """An OpenSSH user certificate blob signed by ``ca`` (or ``signer``) with chosen contents."""
    user_key = user_key or ec.generate_private_key(ec.SECP256R1())
    start = valid_after or now_utc() - timedelta(minutes=1)
    end = valid_before or start + timedelta(hours=24)
    return sshcert.build_user_certificate(
        signer or ca.ssh_key(),
        ssh_key_of(user_key),
        serial=serial or new_serial(),
        key_id=key_id,
        principals=list(principals),
        valid_after=int(start.timestamp()),
        valid_before=int(end.timestamp()),
        xos_extensions={"vo@xos": ca.vo, "groups@xos": "users,staff"} if ext is None else ext,
    )
